"""Where metrics go: `output_dir/metrics.jsonl` (one JSON object per logged step, TRL's metric
names) and TensorBoard event files in `output_dir/runs` (tags `train/<name>`, `eval/<name>`, as
transformers' TensorBoardCallback writes them). Only process 0 writes.

Between two logged steps, per-step values are averaged (TRL's `sum(values) / len(values)`),
except grad_norm, learning_rate (PPO: lr), episode and num_tokens (the running total), which are the last step's,
as transformers and TRL log them.
The running averages are part of the checkpoint, so a resumed run logs what an uninterrupted
one would have.
"""

from __future__ import annotations

import json
import math
import os

LAST_VALUE = ("grad_norm", "learning_rate", "num_tokens", "lr", "episode")  # lr, episode: PPO's names
TIMING = ("eval_runtime", "eval_samples_per_second", "train_runtime", "train_samples_per_second",
          "train_steps_per_second", "step_seconds", "mfu")  # wall-clock fields: differ between identical runs


class IntervalMeans:
    """Per-step metrics -> their means since the last `pop` (LAST_VALUE keys: the last value)."""

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.steps: int = (state or {}).get("steps", 0)

    def add(self, metrics: dict[str, float]):
        for k, v in metrics.items():
            self.sums[k] = v if k in LAST_VALUE else self.sums.get(k, 0.0) + v
        self.steps += 1

    def pop(self) -> dict[str, float]:
        out = {k: v if k in LAST_VALUE else v / self.steps for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return out

    def state(self) -> dict:
        """JSON-able (Python floats round-trip exactly through JSON)."""
        return {"sums": dict(self.sums), "steps": self.steps}


def tensorboard_tag(key: str) -> str:
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard. On resume from `resume_step`, records
    after it (written by the interrupted run) are dropped and TensorBoard purges them too."""

    def __init__(self, output_dir: str, *, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(output_dir, exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(os.path.join(output_dir, "runs"), purge_step=purge)

    def write(self, record: dict):
        """record: {"step": int, "epoch": float, name: value, ...}."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(tensorboard_tag(k), v, record["step"])
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.tb.close()


def read_metrics(output_dir: str) -> list[dict]:
    """The records of output_dir/metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
