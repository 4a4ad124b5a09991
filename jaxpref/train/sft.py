"""SFT for VLMs (TRL's SFTTrainer on prompt-completion data): next-token cross-entropy on the
completion tokens only, images in the prompt.

    jaxpref sft --config jaxpref/tasks/shapes/configs/sft.yaml [key=value ...]

The model sees [image tokens, prompt | completion] (jaxpref.data.processing layouts); PaliGemma
attends bidirectionally within the prefix and causally over the completion (token_type_ids).
"""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp

from jaxpref.config import SFTConfig
from jaxpref.data.processing import ProcessorConfig
from jaxpref.models import VLM
from jaxpref.objectives.sft import sft_loss
from jaxpref.profile import text_flops, vision_flops
from jaxpref.sequence import forward
from jaxpref.train.loop import Task, passes, run


def loss_fn(params, batch: dict, *, model: VLM):
    """(loss_sum, Stats) of one micro-batch: prompt_ids/prompt_mask int32[B, Lp] (left-padded),
    completion_ids/completion_mask int32[B, Lc] (right-padded), pixel_values, valid float32[B].
    Params are cast to the model's (compute) dtype."""
    logits, seq = forward(model, params, batch, batch["completion_ids"], batch["completion_mask"])
    return sft_loss(logits, seq["input_ids"], seq["attention_mask"], seq["completion_mask"], batch["valid"])


def count_tokens(batch: dict):
    """Tokens the model reads (prompt with image tokens, and completion): TRL's num_tokens."""
    return jnp.sum(batch["prompt_mask"]) + jnp.sum(batch["completion_mask"])


def processor_config(cfg: SFTConfig) -> ProcessorConfig:
    return ProcessorConfig(kind="sft", max_prompt_length=None, max_completion_length=None, max_length=cfg.max_length,
                           truncation_mode=cfg.truncation_mode, num_images=cfg.data.num_images,
                           length_buckets=cfg.data.length_buckets)


def step_flops(cfg: SFTConfig, mc, shapes: dict) -> dict[str, float]:
    """Forward and backward (loop.passes: 3 forwards, 2 under LoRA) over [A, B] rows of prompt +
    completion; the tower's backward only when it trains."""
    a, b, lp = shapes["prompt_ids"]
    rows, images = a * b, a * b * shapes["pixel_values"][2]
    tower, text = passes(cfg)
    return {"step": tower * vision_flops(mc, images) + text * text_flops(mc, rows, lp + shapes["completion_ids"][2])}


TASK = Task(head="lm", processor_config=processor_config, make_loss=lambda model, cfg: partial(loss_fn, model=model),
            count_tokens=count_tokens, step_flops=step_flops)


def run_sft(cfg: SFTConfig) -> dict[str, float]:
    """Trains per cfg; the model lands in cfg.output_dir. Returns the last eval metrics."""
    return run(TASK, cfg)
