"""`jaxpref profile`: a recipe's real update step (or a model's forward pass) compiled, timed and
measured here, or compiled ahead of time for a TPU slice and planned.

    jaxpref profile --config configs/paligemma-3b/dpo_rlaif_v.yaml model.name_or_path=paligemma-3b-224 \\
        --topology v5e-16 --json dpo.json
    jaxpref profile --config jaxpref/tasks/shapes/configs/dpo.yaml model.name_or_path=small --trace /tmp/trace
    jaxpref profile --model small --batch 8                 # one forward pass

Here: compile time, step time (median, min, max of --iters calls after --warmup), examples/s and
tokens/s, analytic and XLA FLOPs, achieved FLOP/s and MFU (against the device's peak; on a CPU against
a large matmul timed in the same run), per-device memory against the device's. With --topology
(v4, v5e, v5p, v6e; "v5e-16" or "v5e:4x4"): the same program compiled for the slice on this host,
nothing allocated: per-chip memory against HBM, the collectives, and a step time estimated at
--mfu; when it does not fit, the levers that would, found by compiling them (--no-levers: skip).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp

GiB = 2**30


def add_profile_parser(sub):
    p = sub.add_parser("profile", help="compile, time and size a recipe's update step or a model's forward pass",
                       description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--config", default=None, help="a trainer's recipe (YAML): its real jitted step")
    what.add_argument("--model", default=None, help="preset or HF directory: a forward pass (default: small)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as the trainers take them")
    p.add_argument("--trainer", choices=["sft", "reward", "dpo", "ppo"], default=None,
                   help="which trainer the recipe is for (default: told by its keys)")
    p.add_argument("--phases", action="store_true", help="PPO: also each phase (rollout, scoring, update) alone")
    p.add_argument("--prompt-length", type=int, default=None, help="padded prompt tokens (default: the recipe's)")
    p.add_argument("--completion-length", type=int, default=None,
                   help="padded completion tokens (default: the recipe's)")
    p.add_argument("--batch", type=int, default=8, help="--model: rows (default: 8)")
    p.add_argument("--seq", type=int, default=None, help="--model: sequence length (default: image tokens + 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--model: dtype")
    p.add_argument("--iters", type=int, default=5, help="timed calls after warm-up (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default: 1)")
    p.add_argument("--trace", default=None, metavar="DIR", help="write a jax.profiler trace of the timed calls")
    p.add_argument("--json", default=None, metavar="F", help="write the report as JSON")
    p.add_argument("--topology", default=None,
                   help="compile ahead of time for a TPU slice instead of running: v5e-16, v5p:4x4x4, ... "
                        "(needs libtpu: pip install 'jaxpref[tpu]')")
    p.add_argument("--mfu", type=float, default=0.4, help="--topology: the MFU a step time is estimated at (0.4)")
    p.add_argument("--no-levers", action="store_true", help="--topology: do not search for settings that fit")
    p.add_argument("--mesh-data", type=int, default=-1, help="--model: data axis size (default -1: the rest)")
    p.add_argument("--mesh-fsdp", type=int, default=1, help="--model: fsdp axis size (default 1)")
    p.add_argument("--mesh-tensor", type=int, default=1, help="--model: tensor axis size (default 1)")
    p.set_defaults(func=run_profile)


def run_profile(args) -> int:
    if args.topology:  # nothing is allocated: the host CPU compiles for the slice
        jax.config.update("jax_platforms", "cpu")
    from jaxpref.config import ConfigError
    from jaxpref.models.config import ConfigError as ModelConfigError
    from jaxpref.profile import TopologyError

    try:
        if args.config:
            reports = _profile_recipe(args)
        else:
            if args.overrides:
                raise ConfigError(f"key=value overrides need --config, got {args.overrides}")
            reports = [_profile_model(args)]
    except (ConfigError, ModelConfigError, TopologyError, ValueError) as e:
        print(f"jaxpref profile: {e}", file=sys.stderr)
        return 2
    for r in reports:
        print(format_report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports[0] if len(reports) == 1 else reports, f, indent=1)
        print(f"report written to {args.json}")
    return 0


# ---------------------------------------------------------------------------
# building


def _devices(args):
    from jaxpref.profile import topology_devices

    return topology_devices(args.topology) if args.topology else jax.devices()


def _recipe_program(args, overrides, devices):
    from jaxpref.sharding import make_mesh
    from jaxpref.train.program import build_program, load_recipe

    kind, cfg = load_recipe(args.config, overrides, args.trainer)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    return kind, cfg, mesh, build_program(kind, cfg, mesh, args.prompt_length, args.completion_length)


def _profile_recipe(args) -> list[dict]:
    devices = _devices(args)
    kind, cfg, mesh, prog = _recipe_program(args, args.overrides, devices)
    report = _measure(args, prog, mesh, devices)
    if args.phases and prog.phases:
        report["phases"] = [_measure(args, p, mesh, devices, trace=False) for p in prog.phases]
    if args.topology and not report["fits"] and not args.no_levers:
        report["levers"] = find_levers(args, kind, cfg, devices, report)
    return [report]


def forward_program(model, mesh, batch: int, seq: int | None):
    """A jitted forward pass (logits) of `model` on `mesh`, as a Program over abstract params and rows."""
    from jax.sharding import NamedSharding

    from jaxpref.models import dummy_inputs
    from jaxpref.profile import forward_flops
    from jaxpref.sharding import batch_sharding, on_mesh, param_shapes, param_shardings, placed_shapes
    from jaxpref.train.program import Program

    params = placed_shapes(param_shapes(model), param_shardings(model, mesh))
    px, ids, mask = dummy_inputs(model.config, batch, seq)
    rows = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, x.ndim)) for x in (px, ids, mask)]
    fwd = jax.jit(on_mesh(lambda p, px, ids, mask: model.apply({"params": p}, px, ids, mask).logits, mesh),
                  out_shardings=NamedSharding(mesh, batch_sharding(mesh, 3).spec))
    t = ids.shape[1]
    flops = forward_flops(model.config, batch, t)
    return Program(f"forward B={batch} T={t}", fwd, (params, *rows), flops, batch, batch * t,
                   {"prompt": t, "completion": 0}, donates_first=False)


def _profile_model(args) -> dict:
    from jaxpref.config import ConfigError
    from jaxpref.models import VLM, get_preset, preset_names
    from jaxpref.models.config import read_hf_config
    from jaxpref.sharding import make_mesh

    name = args.model or "small"
    if os.path.isdir(name):
        config = read_hf_config(name)
    elif name in preset_names():
        config = get_preset(name)
    else:
        raise ConfigError(f"--model {name!r} is neither a directory nor a preset ({', '.join(preset_names())})")
    devices = _devices(args)
    if args.topology:
        mesh = make_mesh(args.mesh_data, args.mesh_fsdp, args.mesh_tensor, devices=devices)
    else:  # every local device over fsdp, as before
        mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
    model = VLM(config, dtype=jnp.dtype(args.dtype))
    return _measure(args, forward_program(model, mesh, args.batch, args.seq), mesh, devices)


# ---------------------------------------------------------------------------
# measuring and reporting


def _measure(args, prog, mesh, devices, trace: bool = True) -> dict:
    from jaxpref import profile as pf

    run = not args.topology
    m = pf.measure(prog.fn, prog.args, run=run, iters=args.iters, warmup=args.warmup,
                   trace_dir=args.trace if (trace and run) else None, donates_first=prog.donates_first)
    dev = devices[0]
    chips = pf.count_chips(devices)
    per_chip = len(devices) // chips
    capacity = pf.device_memory_bytes(dev, per_chip)
    spec = pf.device_spec(dev.device_kind)
    peak, peak_source = (spec[0] * chips, "table") if spec else (None, None)
    used = m.per_device_bytes
    xla = m.xla_flops * len(devices) if m.xla_flops else None
    r = {"step": prog.name, "platform": dev.platform if run else "tpu", "topology": args.topology,
         "device_kind": dev.device_kind, "devices": len(devices), "chips": chips, "mesh": dict(mesh.shape),
         "lengths": prog.lengths, "rows": prog.rows, "tokens": prog.tokens,
         "compile_seconds": m.compile_seconds, "step_seconds_median": m.median,
         "step_seconds_min": min(m.step_seconds) if m.step_seconds else None,
         "step_seconds_max": max(m.step_seconds) if m.step_seconds else None,
         # XLA counts one device's share of the partitioned program: x devices for the whole step
         "flops_per_step": prog.flops, "xla_flops_per_step": xla,
         "xla_to_analytic": xla / prog.flops if (xla and prog.flops) else None,
         "per_device_memory_bytes": used, "memory_bytes": m.memory, "device_memory_bytes": capacity,
         "fits": False if m.out_of_memory else (None if capacity is None else used <= capacity),
         "compiler_refused": m.out_of_memory,
         "headroom_bytes": None if capacity is None else capacity - used, "collectives": m.collectives,
         "mfu": None, "peak_flops_per_second": peak, "peak_source": peak_source,
         # the trained params and their optimizer state, per device (what LoRA shrinks)
         "train_state_bytes": pf.argument_bytes(prog.args[0]) if prog.donates_first else None}
    if run:
        if dev.platform == "cpu":
            peak, peak_source = pf.matmul_peak(), "a 2048x2048 float32 matmul on this host, same run"
            r.update(peak_flops_per_second=peak, peak_source=peak_source)
        achieved = prog.flops / m.median
        r.update(examples_per_second=prog.rows / m.median, tokens_per_second=prog.tokens / m.median,
                 achieved_flops_per_second=achieved, mfu=achieved / peak if peak else None)
    else:
        r.update(assumed_mfu=args.mfu,
                 estimated_step_seconds=prog.flops / (peak * args.mfu) if peak else None)
    return r


def format_report(r: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    where = (f"AOT for {r['topology']} ({r['chips']} chips of {r['device_kind']}, {r['devices']} devices)"
             if r["topology"] else f"{r['devices']} x {r['device_kind']}")
    ls = r["lengths"]
    lines = [f"{r['step']}: {where}, mesh {mesh}",
             f"  batch          {r['rows']} rows, prompt {ls['prompt']} + completion {ls['completion']} tokens "
             f"({r['tokens']} tokens)",
             f"  compile        {r['compile_seconds']:.2f} s"]
    if r["step_seconds_median"] is not None:
        lines.append(f"  step           {r['step_seconds_median'] * 1e3:.1f} ms median "
                     f"[{r['step_seconds_min'] * 1e3:.1f}-{r['step_seconds_max'] * 1e3:.1f}]: "
                     f"{r['examples_per_second']:.1f} examples/s, {r['tokens_per_second']:.0f} tokens/s")
    flops = f"  FLOPs          {r['flops_per_step'] / 1e12:.4g} TFLOP per step (analytic)"
    if r["xla_flops_per_step"]:
        flops += (f"; XLA {r['xla_flops_per_step'] / 1e12:.4g} ({r['xla_to_analytic']:.3g}x: a loop's body, "
                  f"such as a scanned layer stack, counted once)")
    lines.append(flops)
    if r.get("mfu") is not None:
        lines.append(f"  MFU            {100 * r['mfu']:.1f} % of {r['peak_flops_per_second'] / 1e12:.3g} TFLOP/s "
                     f"({r['peak_source']})")
    if r.get("estimated_step_seconds") is not None:
        lines.append(f"  est. step      {r['estimated_step_seconds']:.3g} s at {100 * r['assumed_mfu']:.0f} % MFU")
    mem = r["memory_bytes"]
    lines.append(f"  per device     {r['per_device_memory_bytes'] / GiB:.3f} GiB (arguments "
                 f"{mem.get('argument', 0) / GiB:.3f} + outputs {mem.get('output', 0) / GiB:.3f} + temporaries "
                 f"{mem.get('temp', 0) / GiB:.3f} - aliased {mem.get('alias', 0) / GiB:.3f})")
    if r.get("train_state_bytes") is not None:
        lines.append(f"  train state    {r['train_state_bytes'] / GiB:.3f} GiB per device (trained params, optimizer "
                     f"state), in the arguments")
    if r.get("compiler_refused"):
        lines.append(f"  compiler       {r['compiler_refused']}")
    if r["device_memory_bytes"] is not None:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"  device memory  {r['device_memory_bytes'] / GiB:.2f} GiB: {verdict} "
                     f"(headroom {r['headroom_bytes'] / GiB:.2f} GiB)")
    if r["collectives"]:
        lines.append("  collectives    " + ", ".join(f"{k} x{v}" for k, v in r["collectives"].items()))
    for p in r.get("phases", []):
        sec = p["step_seconds_median"]
        lines.append(f"  phase {p['step']:14s} {p['flops_per_step'] / 1e12:.4g} TFLOP, "
                     f"{p['per_device_memory_bytes'] / GiB:.3f} GiB per device"
                     + (f", {sec * 1e3:.1f} ms" if sec is not None else ""))
    for lever in r.get("levers", []):
        lines.append(f"  lever          {' '.join(lever['overrides']) or '(as given)'}: "
                     f"{lever['per_device_memory_bytes'] / GiB:.2f} GiB per device, "
                     f"{'fits' if lever['fits'] else 'does not fit'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# levers: settings that would fit, found by compiling them


def _mesh_sizes(data: int, fsdp: int, tensor: int, n_devices: int) -> list[int]:
    """[data, fsdp, tensor] with a -1 resolved to the devices left over (as make_mesh does)."""
    sizes = [data, fsdp, tensor]
    if -1 in sizes:
        sizes[sizes.index(-1)] = n_devices // math.prod(s for s in sizes if s != -1)
    return sizes


def _global_rows_kept(cfg, data: int, fsdp: int, tensor: int, n_devices: int) -> list[str] | None:
    """Overrides for a new mesh that keep the global batch (per-device rows x batch shards x accumulation)."""
    sizes = _mesh_sizes(data, fsdp, tensor, n_devices)
    shards = sizes[0] * sizes[1]
    old_sizes = _mesh_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n_devices)
    old = cfg.per_device_train_batch_size * old_sizes[0] * old_sizes[1]
    if old % shards == 0 and old // shards >= 1:
        pd, ga = old // shards, cfg.gradient_accumulation_steps
    elif shards % old == 0 and cfg.gradient_accumulation_steps % (shards // old) == 0:
        pd, ga = 1, cfg.gradient_accumulation_steps // (shards // old)
    else:
        return None
    return [f"mesh.data={sizes[0]}", f"mesh.fsdp={sizes[1]}", f"mesh.tensor={sizes[2]}",
            f"per_device_train_batch_size={pd}", f"gradient_accumulation_steps={ga}"]


def _candidates(kind: str, cfg, n_devices: int):
    """(name, overrides) in the order tried: those that leave the numbers alone first."""
    if not cfg.gradient_checkpointing:
        yield "remat", ["gradient_checkpointing=true"]
    if kind in ("dpo", "ppo") and getattr(cfg, "frozen_dtype", "bfloat16") == "float32" and \
            not getattr(cfg, "precompute_ref_log_probs", False):
        yield "frozen models in bfloat16", ["frozen_dtype=bfloat16"]
    if not cfg.bf16:
        yield "bf16 compute", ["bf16=true"]
    if (cfg.mesh.data, cfg.mesh.tensor) != (1, 1):
        over = _global_rows_kept(cfg, 1, -1, 1, n_devices)
        if over:
            yield "fsdp over every chip", over
    pd, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    while pd > 1 and pd % 2 == 0:
        pd, ga = pd // 2, ga * 2
        yield f"micro-batches of {pd} rows per device", [f"per_device_train_batch_size={pd}",
                                                         f"gradient_accumulation_steps={ga}"]
    for t in (2, 4):
        if n_devices % t == 0 and cfg.mesh.tensor < t:
            over = _global_rows_kept(cfg, 1, -1, t, n_devices)
            if over:
                yield f"tensor parallel {t}", over


def _merge(kept: list[str], over: list[str]) -> list[str]:
    """key=value overrides, `over` replacing `kept`'s values of the same keys."""
    merged = dict(o.split("=", 1) for o in kept)
    merged.update(o.split("=", 1) for o in over)
    return [f"{k}={v}" for k, v in merged.items()]


def find_levers(args, kind: str, cfg, devices, report: dict) -> list[dict]:
    """Levers tried one at a time on top of those kept so far (kept when it lowers per-device memory),
    until the step fits or none is left. Each entry: the lever, the overrides it was tried with,
    per-device bytes, fits. Candidates come from the settings kept so far, so micro-batches keep
    halving while that helps. LoRA is not among them yet."""
    from jaxpref.config import ConfigError

    kept: list[str] = []
    best = report["per_device_memory_bytes"]
    tried: list[dict] = []
    seen: set[str] = set()
    current = cfg
    while True:
        cand = next(((n, o) for n, o in _candidates(kind, current, len(devices)) if n not in seen), None)
        if cand is None:
            return tried
        name, over = cand
        seen.add(name)
        trial = _merge(kept, over)
        try:
            _, c, mesh, prog = _recipe_program(args, list(args.overrides) + trial, devices)
            r = _measure(args, prog, mesh, devices, trace=False)
        except (ConfigError, ValueError) as e:
            tried.append({"lever": name, "overrides": trial, "error": str(e), "per_device_memory_bytes": best,
                          "fits": False})
            continue
        tried.append({"lever": name, "overrides": trial, "per_device_memory_bytes": r["per_device_memory_bytes"],
                      "fits": r["fits"], "estimated_step_seconds": r.get("estimated_step_seconds")})
        print(f"  tried {name}: {r['per_device_memory_bytes'] / GiB:.2f} GiB per device", file=sys.stderr)
        if r["per_device_memory_bytes"] < best:
            kept, best, current = trial, r["per_device_memory_bytes"], c
        if r["fits"]:
            return tried


__all__ = ["add_profile_parser", "run_profile", "format_report", "find_levers", "forward_program"]
