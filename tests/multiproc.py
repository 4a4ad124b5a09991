"""Run a function in N real processes joined by jax.distributed on localhost (CPU, gloo collectives).

    results = run_processes(worker_fn, n=2, args=(...))   # worker_fn(process_id, *args) -> JSON-able

The worker runs in a fresh interpreter (`python -c`), imports `module:function`, and prints
its JSON result on the last line; a failing process fails the caller with its stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

_BOOT = r"""
import json, os, sys
sys.path[:0] = {paths!r}
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes={n}, process_id={pid})
import importlib
mod, fn = {target!r}.split(":")
out = getattr(importlib.import_module(mod), fn)({pid}, *json.loads({args!r}))
print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(target: str, n: int = 2, args=(), devices_per_process: int = 1, timeout: float = 300):
    port = _free_port()
    paths = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               JAX_PLATFORMS="cpu")
    logs = [tempfile.TemporaryFile("w+") for _ in range(n)]  # files, not pipes: a full pipe would deadlock
    procs = [subprocess.Popen([sys.executable, "-c", _BOOT.format(paths=paths, port=port, n=n, pid=i, target=target,
                                                                 args=json.dumps(list(args)))],
                              stdout=logs[i], stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(n)]
    try:
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"process {i} timed out after {timeout} s") from None
        results = []
        for i, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            out = log.read()
            if p.returncode != 0:
                raise RuntimeError(f"process {i} exited with {p.returncode}:\n{out[-4000:]}")
            line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
            results.append(json.loads(line[len("RESULT "):]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
