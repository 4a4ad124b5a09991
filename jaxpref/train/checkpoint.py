"""Orbax checkpoints of a run: `output_dir/checkpoints/<step>/{state, data, config}`.

  state   the TrainState (params, optimizer state, step, rng), sharded arrays
  data    JSON: every process's data-iterator state and the loop's counters
  config  JSON: the run's config

Saves are asynchronous (the device-to-host copy happens before `save` returns, so the next step
may donate the state; the writing continues in the background). Orbax writes a step into
`<step>.orbax-checkpoint-tmp-*` and renames it when complete: a run killed mid-save leaves only
a tmp directory, which is never listed as a checkpoint and is deleted when the directory is
next opened. Restoring takes target shardings, so a checkpoint saved on one mesh restores onto
another.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


class Checkpointer:
    """save / restore / latest_step over one checkpoints directory."""

    def __init__(self, directory: str, *, save_total_limit: int | None = None, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=True,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=save_total_limit))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data: dict, config: dict):
        """Starts an asynchronous save of step `step` (waits for the previous one first)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), config=ocp.args.JsonSave(config)))

    def restore(self, step: int, target) -> tuple:
        """(state, data, config) of `step`; `target`: the state as ShapeDtypeStructs with the
        shardings to restore onto (any mesh)."""
        r = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        return r.state, r.data, r.config

    def wait(self):
        """Blocks until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def resolve_resume(resume, output_dir: str) -> tuple[str, int] | None:
    """(checkpoints directory, step) to resume from, or None for a fresh start.

    resume: None/False: none; True/"latest": the latest complete checkpoint under output_dir
    (None if there is none); a path: a step directory (`.../checkpoints/120`), a checkpoints
    directory, or a run's output_dir (its latest step). Raises FileNotFoundError for a path
    without a complete checkpoint.
    """
    if resume in (None, False):
        return None
    if resume is True or resume == "latest":
        directory = os.path.join(output_dir, CHECKPOINTS)
        step = _latest(directory)
        return None if step is None else (directory, step)
    path = os.path.abspath(str(resume))
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(path):
        directory, step = os.path.dirname(path), int(name)
        if step not in complete_steps(directory):
            raise FileNotFoundError(f"resume_from_checkpoint={resume}: not a complete checkpoint "
                                    f"(complete ones in {directory}: {complete_steps(directory)})")
        return directory, step
    for directory in (os.path.join(path, CHECKPOINTS), path):
        if (step := _latest(directory)) is not None:
            return directory, step
    raise FileNotFoundError(f"resume_from_checkpoint={resume}: no complete checkpoint in {path} "
                            f"or {os.path.join(path, CHECKPOINTS)}")


def complete_steps(directory: str) -> list[int]:
    """Steps with a complete (finalized) checkpoint in `directory`, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.utils.checkpoint_steps(directory))


def _latest(directory: str) -> int | None:
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def gather_json(obj) -> list:
    """`obj` (JSON-able) from every process, in process order."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros(n, np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]
