"""The reward model for VLMs (TRL's RewardTrainer, extended to images): a scalar head on the VLM
backbone, scored at the last token of prompt + completion (TRL's reading; `score_pooling: mean`
averages the head over the completion's tokens instead), trained on preference pairs.

    jaxpref reward --config jaxpref/tasks/shapes/configs/reward.yaml [key=value ...]

Chosen and rejected go through ONE forward pass, interleaved on the batch axis (rows 2i and
2i + 1 are pair i, so each device keeps its own pairs), and each pair's images are encoded once.
Evaluation reports eval_accuracy: the held-out pairwise accuracy.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax.numpy as jnp

from jaxpref.config import RewardConfig
from jaxpref.data.processing import ProcessorConfig
from jaxpref.models import VLM
from jaxpref.models.config import VLMConfig
from jaxpref.objectives.reward import reward_loss
from jaxpref.profile import text_flops, vision_flops
from jaxpref.sequence import pair_scores
from jaxpref.train.loop import Task, passes, run


def rewards(params, batch: dict, *, model: VLM):
    """(r_chosen float32[B], r_rejected float32[B]) for a preference batch: prompt_ids/prompt_mask
    int32[B, Lp], chosen_/rejected_ids and _mask int32[B, Lc], pixel_values float32[B, n, H, W, 3]."""
    return pair_scores(model, params, batch)


def loss_fn(params, batch: dict, *, model: VLM, center_rewards_coefficient: float | None):
    """(loss_sum, Stats) of one micro-batch (see `rewards`; margin float32[B] when the data has it)."""
    r_chosen, r_rejected = rewards(params, batch, model=model)
    return reward_loss(r_chosen, r_rejected, batch["valid"], margin=batch.get("margin"),
                       center_rewards_coefficient=center_rewards_coefficient)


def count_tokens(batch: dict):
    """Tokens of both sequences, prompt included (TRL's num_tokens)."""
    return 2 * jnp.sum(batch["prompt_mask"]) + jnp.sum(batch["chosen_mask"]) + jnp.sum(batch["rejected_mask"])


def processor_config(cfg: RewardConfig) -> ProcessorConfig:
    return ProcessorConfig(kind="preference", max_prompt_length=None, max_completion_length=None,
                           max_length=cfg.max_length, num_images=cfg.data.num_images,
                           length_buckets=cfg.data.length_buckets)


def _make_loss(model: VLM, cfg: RewardConfig):
    return partial(loss_fn, model=model, center_rewards_coefficient=cfg.center_rewards_coefficient)


def _configure_model(config: VLMConfig, cfg: RewardConfig) -> VLMConfig:
    """The reward model reads its scores as cfg.score_pooling says (saved in its config.json)."""
    return dataclasses.replace(config, score_pooling=cfg.score_pooling)


def step_flops(cfg: RewardConfig, mc, shapes: dict) -> dict[str, float]:
    """Forward and backward over both sequences of [A, B] pairs (each pair's images once), a scalar head."""
    a, b, lp = shapes["prompt_ids"]
    rows, images = a * b, a * b * shapes["pixel_values"][2]
    tower, text = passes(cfg)
    return {"step": tower * vision_flops(mc, images)
            + text * text_flops(mc, 2 * rows, lp + shapes["chosen_ids"][2], head_width=1)}


TASK = Task(head="scalar", processor_config=processor_config, make_loss=_make_loss, count_tokens=count_tokens,
            configure_model=_configure_model, step_flops=step_flops)


def run_reward(cfg: RewardConfig) -> dict[str, float]:
    """Trains per cfg; the reward model (HF safetensors with `score.weight`) lands in cfg.output_dir."""
    return run(TASK, cfg)
