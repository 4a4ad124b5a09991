"""Training configs: frozen dataclasses with TRL / transformers field names and defaults.

    cfg = load_config("reward", "jaxpref/tasks/shapes/configs/reward.yaml", ["learning_rate=3e-4", "mesh.fsdp=2"])
    print(to_yaml(cfg))

A config is the algorithm's fields (TRL's `TrainingArguments` names, e.g. `learning_rate`,
`per_device_train_batch_size`, plus the trainer's own: `center_rewards_coefficient` ...) and three
jaxpref sections: `model` (what to train), `data` (what to read) and `mesh` (where to run).
YAML files and `key=value` overrides (dotted for sections: `data.shuffle_buffer=64`) are parsed
against the declared field types; an unknown key or a bad value raises ConfigError naming the
key and what it allows. Algorithms register their config class with `register_config`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Sequence

import yaml

from jaxpref.data.loader import BAD_RECORD_POLICIES
from jaxpref.data.processing import TRUNCATION_MODES
from jaxpref.models.config import SCORE_POOLINGS, ConfigError  # one error class for every config
from jaxpref.objectives.dpo import LOSSES
from jaxpref.objectives.ppo import KL_ESTIMATORS
from jaxpref.train.optim import SCHEDULES, schedule_kwargs

REWARD_MODEL_TYPES = ("scalar", "implicit")  # PPOConfig.reward_model_type


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    name_or_path: str = "small"
    """A preset name (`jaxpref.models.preset_names()`: random init) or a Hugging Face model directory."""
    dtype: str = "float32"
    """Parameter (master weight) dtype: float32 or bfloat16."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed (the projector and decoder train), as LLaVA's second stage
    does: no gradient flows into the tower, and the optimizer neither updates nor decays it. PPO: for
    the policy and the value model. With use_peft, adapters inside the tower are left out."""
    use_peft: bool = False
    """Train LoRA adapters on a frozen base instead of the full weights (TRL's --use_peft); the run
    exports a PEFT adapter directory. name_or_path may be such a directory (the run continues it)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha: the adapter's output is scaled by lora_alpha / lora_r (/ sqrt(lora_r) with use_rslora)."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' inputs while training (SFT; DPO and reward only with disable_dropout=false)."""
    lora_target_modules: tuple[str, ...] | None = None
    """Which linear layers get adapters, by transformers' module names: "all-linear" (every linear
    layer but the LM head, vision tower and projector included), or names matched as PEFT does (a
    module whose name equals one or ends in "." + one); a single name is a regular expression over the
    whole name (TRL's reading: `[q_proj]` alone matches nothing, `.*q_proj` does)."""
    lora_modules_to_save: tuple[str, ...] | None = None
    """Modules trained whole beside the adapters (e.g. multi_modal_projector); the reward model's score
    head always is."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r)."""


@dataclasses.dataclass(frozen=True)
class DataArgs:
    dataset_name: str = ""
    """Dataset source: a local directory or glob of parquet/arrow/array_record shards (see jaxpref.data.sources)."""
    dataset_train_split: str = "train"
    """Split of `dataset_name` to train on."""
    dataset_test_split: str | None = None
    """Split to evaluate on (None: no evaluation)."""
    tokenizer: str | None = None
    """'shapes' (the built-in task's tokenizer) or a tokenizer directory; None: the model directory."""
    on_bad_record: str = "error"
    """What a row that cannot be processed does: stop the run ('error') or be counted and skipped ('skip')."""
    shuffle_buffer: int = 1024
    """Examples in the shuffle buffer of the training stream (1: no shuffling)."""
    num_images: int = 1
    """Images per row; a row with another number is a bad record."""
    length_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    """Padded lengths of prompts and completions: a step compiles once per bucket pair."""


@dataclasses.dataclass(frozen=True)
class MeshArgs:
    data: int = 1
    """Data-parallel axis size (-1: the devices left over)."""
    fsdp: int = -1
    """Parameter-sharding (ZeRO-3) axis size (-1: the devices left over)."""
    tensor: int = 1
    """Tensor-parallel axis size."""


@dataclasses.dataclass(frozen=True)
class SchedulerArgs:
    """transformers' `lr_scheduler_kwargs`: the schedule's own parameters (null: transformers' default).
    Each schedule takes some of them (jaxpref.train.optim.SCHEDULES); setting another is an error."""

    num_cycles: float | None = None
    """cosine / cosine_with_min_lr / warmup_stable_decay: waves of the cosine (0.5: one decay to the floor);
    cosine_with_restarts: the number of hard restarts (1)."""
    min_lr: float | None = None
    """cosine_with_min_lr: the floor the cosine decays to (or min_lr_rate; one of them is required)."""
    min_lr_rate: float | None = None
    """cosine_with_min_lr: the floor as a fraction of learning_rate."""
    lr_end: float | None = None
    """polynomial: the learning rate at the end (1e-7; must be below learning_rate)."""
    power: float | None = None
    """polynomial: the decay's power (1.0: linear)."""
    timescale: int | None = None
    """inverse_sqrt: the step scale of the decay (default: the warmup steps, or 10 000 without warmup)."""
    num_decay_steps: int | None = None
    """warmup_stable_decay: steps of the final decay (required)."""
    num_stable_steps: int | None = None
    """warmup_stable_decay: steps at learning_rate (default: the steps left after warmup and decay)."""
    warmup_type: str | None = None
    """warmup_stable_decay: linear (default), cosine or 1-sqrt."""
    decay_type: str | None = None
    """warmup_stable_decay: cosine (default), linear or 1-sqrt."""
    min_lr_ratio: float | None = None
    """warmup_stable_decay: where warmup starts and decay ends, as a fraction of learning_rate (0)."""


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Fields every trainer shares (transformers' TrainingArguments names; TRL's defaults where TRL overrides)."""

    output_dir: str = ""
    """Where checkpoints, metrics.jsonl, TensorBoard events and the final model go (required)."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warmup (jaxpref.train.optim.SCHEDULES)."""
    lr_scheduler_kwargs: SchedulerArgs = SchedulerArgs()
    """The schedule's parameters (transformers' names), e.g. `lr_scheduler_kwargs.num_decay_steps=300`."""
    warmup_ratio: float = 0.0
    """Fraction of the training steps spent in linear warmup (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to learning_rate (takes precedence over warmup_ratio)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay; never applied to biases and norm scales."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.999
    """AdamW second-moment decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon (added to the root of the second moment)."""
    max_grad_norm: float = 1.0
    """Clip gradients to this global norm (0: no clipping)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step, accumulated inside one jitted step."""
    per_device_train_batch_size: int = 8
    """Training examples per batch-sharded device and micro-batch (global = this x data x fsdp)."""
    per_device_eval_batch_size: int = 8
    """Evaluation examples per batch-sharded device."""
    num_train_epochs: float = 3.0
    """Passes over the training data (used when max_steps <= 0; needs a source that knows its size)."""
    max_steps: int = -1
    """Optimizer steps to run; overrides num_train_epochs when > 0."""
    seed: int = 42
    """Seed of the parameter init, the data order and the step RNG."""
    logging_steps: int = 10
    """Optimizer steps between two lines of metrics.jsonl (values averaged over them, as TRL does)."""
    eval_steps: int | None = None
    """Evaluate every N optimizer steps (None: only at the end); needs data.dataset_test_split."""
    save_steps: int = 500
    """Save an Orbax checkpoint every N optimizer steps (and at the end)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (None: all)."""
    resume_from_checkpoint: str | bool | None = None
    """true/'latest': the latest checkpoint in output_dir (fresh start if none); a path: that checkpoint."""
    bf16: bool = True
    """Compute in bfloat16 with float32 master parameters (TRL's default)."""
    gradient_checkpointing: bool = True
    """Recompute each layer's activations in the backward pass (TRL's default)."""
    profile_steps: tuple[int, ...] | None = None
    """[start, stop]: write a jax.profiler trace of optimizer steps start .. stop - 1 to
    output_dir/trace (TensorBoard's profile plugin and Perfetto open it); null: none."""
    model: ModelArgs = ModelArgs()
    """What to train."""
    data: DataArgs = DataArgs()
    """What to read."""
    mesh: MeshArgs = MeshArgs()
    """Device mesh sizes."""

    def validate(self) -> "TrainingConfig":
        """Checks every value; raises ConfigError naming the key and what it allows."""

        _check(bool(self.output_dir), "output_dir", "is required")
        _choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULES)
        try:
            schedule_kwargs(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _choice("model.dtype", self.model.dtype, ("float32", "bfloat16"))
        if self.model.use_peft:
            _check(self.model.lora_r >= 1, "model.lora_r", "must be >= 1")
            _check(self.model.lora_alpha > 0, "model.lora_alpha", "must be > 0")
            _check(0 <= self.model.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)")
            _check(bool(self.model.lora_target_modules), "model.lora_target_modules",
                   "is required with use_peft (PEFT has no default for VLMs): 'all-linear' or module names")
        _choice("data.on_bad_record", self.data.on_bad_record, BAD_RECORD_POLICIES)
        _check(bool(self.data.dataset_name), "data.dataset_name", "is required")
        _check(self.learning_rate >= 0, "learning_rate", "must be >= 0")
        _check(0 <= self.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        _check(self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: no clipping)")
        for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "logging_steps", "save_steps"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("warmup_steps",):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "max_steps",
               "must be > 0 unless num_train_epochs is > 0")
        for name in ("eval_steps", "save_total_limit"):
            v = getattr(self, name)
            _check(v is None or v >= 1, name, "must be >= 1 or null")
        _check(self.eval_steps is None or self.data.dataset_test_split is not None, "eval_steps",
               "needs data.dataset_test_split")
        _check(self.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        p = self.profile_steps
        _check(p is None or (len(p) == 2 and 1 <= p[0] < p[1]), "profile_steps",
               f"must be [start, stop] with 1 <= start < stop, got {list(p) if p else p}")
        _check(self.data.num_images >= 0, "data.num_images", "must be >= 0")
        b = self.data.length_buckets
        _check(bool(b) and list(b) == sorted(set(b)) and b[0] >= 1, "data.length_buckets",
               "must be increasing positive lengths")
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self.mesh, name)
            _check(v == -1 or v >= 1, f"mesh.{name}", "must be >= 1 or -1 (the devices left over)")
        _check([self.mesh.data, self.mesh.fsdp, self.mesh.tensor].count(-1) <= 1, "mesh",
               "at most one of data, fsdp, tensor may be -1")
        return self


@dataclasses.dataclass(frozen=True)
class SFTConfig(TrainingConfig):
    """TRL's SFTConfig: loss on completion tokens only (prompt-completion data)."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW (TRL's SFT default)."""
    max_length: int | None = 1024
    """Prompt + completion tokens (image tokens included); longer examples are truncated."""
    truncation_mode: str = "keep_start"
    """Which end of the prompt text survives truncation: keep_start or keep_end."""

    def validate(self) -> "SFTConfig":

        super().validate()
        _choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        _check(self.max_length is None or self.max_length >= 1, "max_length", "must be >= 1 or null")
        return self


@dataclasses.dataclass(frozen=True)
class RewardConfig(TrainingConfig):
    """TRL's RewardConfig: a scalar head on the VLM, pairwise loss."""

    learning_rate: float = 1e-4
    """Peak learning rate of AdamW (TRL's reward default)."""
    max_length: int | None = 1024
    """Prompt + completion tokens (image tokens included); longer examples are truncated."""
    center_rewards_coefficient: float | None = None
    """Weight of mean((r_chosen + r_rejected)^2) in the loss, pulling rewards to mean zero (TRL suggests 0.01)."""
    score_pooling: str = "last"
    """How the scalar head's per-position values become one score: "last" (TRL: the last non-pad
    token) or "mean" (jaxpref: the mean over the completion's tokens, so each answer token is scored
    where it is read, e.g. a color word next to the image). Saved in the model's config.json, so PPO
    and `jaxpref eval` read the reward model's scores the same way. "mean" ranks given answers better
    on the built-in task, but PPO can exploit it: a short answer with no wrong word scores like a
    complete one (docs/TRAINING.md)."""
    disable_dropout: bool = True
    """TRL's: no dropout while training (jaxpref's models have none but LoRA's, model.lora_dropout)."""

    def validate(self) -> "RewardConfig":
        super().validate()
        _check(self.max_length is None or self.max_length >= 1, "max_length", "must be >= 1 or null")
        c = self.center_rewards_coefficient
        _check(c is None or c >= 0, "center_rewards_coefficient", "must be >= 0 or null")
        _choice("score_pooling", self.score_pooling, SCORE_POOLINGS)
        return self


@dataclasses.dataclass(frozen=True)
class DPOConfig(TrainingConfig):
    """TRL's DPOConfig: the policy against a frozen reference, straight from preference pairs."""

    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (TRL's DPO default)."""
    beta: float = 0.1
    """Strength of the implicit KL leash to the reference (TRL's beta)."""
    loss_type: tuple[str, ...] = ("sigmoid",)
    """One loss type or several summed with loss_weights (jaxpref.objectives.dpo.LOSSES)."""
    loss_weights: tuple[float, ...] | None = None
    """Weight of each loss_type (None: 1 each)."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate of the pairs, in [0, 0.5): used by the robust loss."""
    max_length: int | None = 1024
    """Prompt + longest completion tokens (image tokens included); longer examples are truncated."""
    max_prompt_length: int | None = 512
    """Prompt tokens, image tokens included (only the prompt's text is ever cut; null: no limit)."""
    max_completion_length: int | None = None
    """Completion tokens (eos included); the start is kept (null: only max_length applies)."""
    truncation_mode: str = "keep_start"
    """Which end of the prompt text survives truncation: keep_start or keep_end."""
    precompute_ref_log_probs: bool = False
    """Run the reference once over the train and eval splits before training, store its log-probs
    by row position in output_dir/ref_logps/, and free it (works with images, unlike TRL)."""
    ref_model: str | None = None
    """The frozen reference: a preset or an HF directory (null: the weights training starts from)."""
    frozen_dtype: str = "float32"
    """dtype the reference is held in: float32 or bfloat16 (half the memory; it computes in the
    step's dtype either way)."""
    disable_dropout: bool = True
    """TRL's: no dropout while training (jaxpref's models have none but LoRA's, model.lora_dropout)."""

    def validate(self) -> "DPOConfig":

        super().validate()
        _choice("frozen_dtype", self.frozen_dtype, ("float32", "bfloat16"))
        _choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        _check(bool(self.loss_type), "loss_type", f"needs at least one of {sorted(LOSSES)}")
        for t in self.loss_type:
            _choice("loss_type", t, sorted(LOSSES))
        _check(self.loss_weights is None or len(self.loss_weights) == len(self.loss_type), "loss_weights",
               f"has {len(self.loss_weights or ())} entries but loss_type has {len(self.loss_type)}")
        _check(self.beta > 0, "beta", "must be > 0")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            _check(v is None or v >= 1, name, "must be >= 1 or null")
        return self


@dataclasses.dataclass(frozen=True)
class PPOConfig(TrainingConfig):
    """TRL's PPOConfig: policy + value model trained, reference + reward model frozen.
    model.name_or_path is the policy's start (TRL's sft_model_path). One step is one PPO
    iteration: a rollout batch of per_device_train_batch_size x (data x fsdp) x
    gradient_accumulation_steps x num_mini_batches prompts, then the update."""

    learning_rate: float = 3e-6
    """Peak learning rate of AdamW (TRL's PPO default); the schedule advances once per iteration."""
    reward_model_path: str = ""
    """The frozen reward model (required): an HF directory with a scalar head (jaxpref reward's
    output), or with reward_model_type "implicit" a DPO policy (jaxpref dpo's output)."""
    reward_model_type: str = "scalar"
    """"scalar" (TRL): the scalar head's score of prompt + response. "implicit" (jaxpref): DPO's
    implicit reward, implicit_reward_beta x sum over the response's tokens of log pi_rm - log
    pi_ref at temperature 1, pi_rm = reward_model_path, pi_ref = the reference (ref_model), which
    must be the reference that DPO policy was trained against: a reward model trained on the
    comparisons with DPO's loss (the rewards/chosen jaxpref dpo logs, read as a reward)."""
    implicit_reward_beta: float = 0.1
    """beta of the implicit reward (reward_model_type "implicit"): the DPO run's beta."""
    value_model_path: str | None = None
    """The value model's start (null: reward_model_path, as TRL initialises it)."""
    ref_model: str | None = None
    """The frozen reference (null: the policy's starting weights, model.name_or_path)."""
    frozen_dtype: str = "float32"
    """dtype the reference and reward model are held in: float32 or bfloat16."""
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Mini-batches (one optimizer step each) per epoch."""
    total_episodes: int | None = None
    """Prompts to roll out in all (sets max_steps = ceil(total_episodes / rollout batch) when max_steps <= 0)."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the reference in the reward."""
    kl_estimator: str = "k1"
    """Per-token KL estimate: k1 (logp - ref) or k3 ((r - 1) - log r, r = ref / p)."""
    cliprange: float = 0.2
    """Policy ratio clip range."""
    cliprange_value: float = 0.2
    """Value prediction clip range around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (no mean shift) before GAE."""
    response_length: int = 53
    """Tokens sampled per response."""
    temperature: float = 0.7
    """Sampling temperature; every log-prob uses logits / (temperature + 1e-7)."""
    stop_token: str | None = None
    """'eos': responses end at the model's eos token (everything after it is pad); null: no stop token."""
    stop_token_id: int | None = None
    """A stop token id (overrides stop_token)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses without a stop token (null: none)."""
    max_prompt_length: int | None = None
    """Prompt tokens, image tokens included (only the prompt's text is cut, from the start; null: no limit)."""
    eval_num_prompts: int = 64
    """Held-out prompts the policy and the reference answer at each evaluation."""
    judge: str | None = None
    """The judge of those answers (jaxpref.rewards: a registered name such as `shapes`, or module:function);
    null: the evaluation reports the reward model's numbers only."""

    def validate(self) -> "PPOConfig":

        super().validate()
        _check(bool(self.reward_model_path), "reward_model_path", "is required")
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("reward_model_type", self.reward_model_type, REWARD_MODEL_TYPES)
        _check(self.implicit_reward_beta > 0, "implicit_reward_beta", "must be > 0")
        _choice("frozen_dtype", self.frozen_dtype, ("float32", "bfloat16"))
        _check(self.stop_token in (None, "eos"), "stop_token", "must be 'eos' or null")
        for name in ("num_ppo_epochs", "num_mini_batches", "response_length", "eval_num_prompts"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("kl_coef", "cliprange", "cliprange_value", "vf_coef"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        _check(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.total_episodes is None or self.total_episodes >= 1, "total_episodes", "must be >= 1 or null")
        _check(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length",
               "must be >= 1 or null")
        return self


# ---------------------------------------------------------------------------
# registry

CONFIGS: dict[str, type[TrainingConfig]] = {}


def register_config(name: str, cls: type[TrainingConfig]) -> type[TrainingConfig]:
    """Makes `cls` loadable as `load_config(name, ...)` (e.g. register_config("dpo", DPOConfig))."""
    CONFIGS[name] = cls
    return cls


register_config("sft", SFTConfig)
register_config("reward", RewardConfig)
register_config("dpo", DPOConfig)
register_config("ppo", PPOConfig)


# ---------------------------------------------------------------------------
# building from YAML and overrides


def _check(ok: bool, key: str, msg: str):
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _choice(key: str, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {sorted(allowed)}")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp))


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _coerce(value: Any, tp, key: str, from_text: bool):
    """`value` (from YAML, or a command-line string when from_text) as type `tp`, or ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_text and str(value).lower() in ("null", "none"))):
            return None
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):  # str last
            try:
                return _coerce(value, a, key, from_text)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        items = value
        if isinstance(value, str):
            items = [v for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, typing.get_args(tp)[0], key, True)
                     for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if math.isfinite(f):
                    return f
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if not from_text and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key}: is a section; set its fields ({', '.join(_field_names(tp))}), "
                          f"e.g. {key}.{_field_names(tp)[0]}=...")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _all_keys(cls, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        if name not in _field_names(cls):
            continue
        out += _all_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return out


def _set(tree: dict, cls, key: str, value, root, from_text: bool, prefix: str = ""):
    """Sets dotted `key` of the nested dict `tree` (for dataclass `cls`), typed; `prefix` is the
    section path so far (for messages)."""
    head, _, rest = key.partition(".")
    full = prefix + head
    if head not in _field_names(cls):
        raise ConfigError(f"unknown key {prefix + key!r} for {root.__name__}; allowed keys: "
                          f"{', '.join(_all_keys(root))}")
    tp = _hints(cls)[head]
    if not dataclasses.is_dataclass(tp):
        if rest:
            raise ConfigError(f"{full}: is not a section, {prefix + key!r} does not exist")
        tree[head] = _coerce(value, tp, full, from_text)
    elif rest:
        _set(tree.setdefault(head, {}), tp, rest, value, root, from_text, full + ".")
    elif isinstance(value, dict):
        for k, v in value.items():
            _set(tree.setdefault(head, {}), tp, str(k), v, root, from_text, full + ".")
    else:
        _coerce(value, tp, full, from_text)  # raises "is a section"


def _build(cls, tree: dict):
    kw = {}
    for name, tp in _hints(cls).items():
        if name in tree:
            kw[name] = _build(tp, tree[name]) if dataclasses.is_dataclass(tp) else tree[name]
    return cls(**kw)


def config_from_dict(cls: type[TrainingConfig], d: dict, overrides: Sequence[str] = ()) -> TrainingConfig:
    """A validated `cls` from a (YAML-loaded) dict and `key=value` overrides applied after it."""
    tree: dict = {}
    if not isinstance(d, dict):
        raise ConfigError(f"expected a mapping of keys to values, got {type(d).__name__}")
    for k, v in d.items():
        _set(tree, cls, str(k), v, cls, from_text=False)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. learning_rate=1e-4, mesh.fsdp=2)")
        try:
            _set(tree, cls, key.strip(), value.strip(), cls, from_text=True)
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return _build(cls, tree).validate()


def load_config(kind: str, path: str | None = None, overrides: Sequence[str] = ()) -> TrainingConfig:
    """The `kind` config ("sft", "reward", ...) from a YAML file (optional) plus overrides."""
    if kind not in CONFIGS:
        raise ConfigError(f"unknown trainer {kind!r}; choose one of {sorted(CONFIGS)}")
    d: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return config_from_dict(CONFIGS[kind], d, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg) -> dict:
    """Plain dict (tuples as lists): what to_yaml writes and config_from_dict reads back. The
    lr_scheduler_kwargs section lists only the parameters set, as transformers' dict does."""
    def plain(x):
        return list(x) if isinstance(x, tuple) else x

    if isinstance(cfg, SchedulerArgs):
        return {f.name: v for f in dataclasses.fields(cfg) if (v := getattr(cfg, f.name)) is not None}
    return {f.name: to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else plain(v)
            for f in dataclasses.fields(cfg)}


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_kind(cfg: TrainingConfig) -> str:
    """The registry name of cfg's class."""
    for name, cls in CONFIGS.items():
        if type(cfg) is cls:
            return name
    raise ConfigError(f"{type(cfg).__name__} is not registered (register_config)")
