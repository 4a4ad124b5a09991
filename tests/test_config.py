"""Configs: TRL/transformers defaults, YAML + typed dotted overrides, errors that name the key."""

import dataclasses

import pytest
import yaml

from jaxpref.config import (CONFIGS, ConfigError, RewardConfig, SFTConfig, TrainingConfig, config_from_dict,
                            load_config, register_config, to_yaml)

BASE = {"output_dir": "out", "data": {"dataset_name": "d"}}


def test_defaults_follow_transformers_and_trl():
    from transformers import TrainingArguments

    hf = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    cfg = TrainingConfig()
    for name in ("adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "weight_decay", "lr_scheduler_type",
                 "warmup_steps", "gradient_accumulation_steps", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "num_train_epochs", "max_steps", "seed", "save_steps",
                 "save_total_limit", "eval_steps", "learning_rate"):
        assert getattr(cfg, name) == hf[name], name
    # TRL's overrides of transformers' defaults
    assert (cfg.logging_steps, cfg.bf16, cfg.gradient_checkpointing) == (10, True, True)
    assert SFTConfig().learning_rate == 2e-5 and SFTConfig().max_length == 1024
    assert RewardConfig().learning_rate == 1e-4 and RewardConfig().center_rewards_coefficient is None
    assert RewardConfig().max_length == 1024 and RewardConfig().score_pooling == "last"  # TRL reads the last token
    with pytest.raises(ConfigError, match=r"score_pooling: 'max' is not one of \['last', 'mean'\]"):
        config_from_dict(RewardConfig, BASE, ["score_pooling=max"])


def test_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "learning_rate": "1e-4", "model": {"name_or_path": "tiny"},
                                    "mesh": {"fsdp": 2}}))
    cfg = load_config("reward", str(path), [
        "center_rewards_coefficient=0.01", "bf16=false", "mesh.tensor=4", "data.length_buckets=16,64",
        "eval_steps=5", "data.dataset_test_split=eval", "save_total_limit=null", "resume_from_checkpoint=true",
        "max_steps=7"])
    assert isinstance(cfg, RewardConfig)
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.center_rewards_coefficient == 0.01 and cfg.bf16 is False
    assert (cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.data) == (2, 4, 1)
    assert cfg.data.length_buckets == (16, 64) and cfg.eval_steps == 5 and cfg.max_steps == 7
    assert cfg.save_total_limit is None and cfg.resume_from_checkpoint is True
    assert cfg.model.name_or_path == "tiny" and cfg.data.dataset_name == "d"
    path_cfg = load_config("reward", str(path), ["resume_from_checkpoint=out/checkpoints/10"])
    assert path_cfg.resume_from_checkpoint == "out/checkpoints/10"


def test_to_yaml_round_trips(tmp_path):
    cfg = config_from_dict(SFTConfig, BASE, ["truncation_mode=keep_end", "data.num_images=2", "warmup_ratio=0.1",
                                             "lr_scheduler_type=warmup_stable_decay",
                                             "lr_scheduler_kwargs.num_decay_steps=30"])
    assert cfg.lr_scheduler_kwargs.num_decay_steps == 30 and cfg.lr_scheduler_kwargs.decay_type is None
    assert "lr_scheduler_kwargs:\n  num_decay_steps: 30\n" in to_yaml(cfg)  # only what is set
    assert "lr_scheduler_kwargs: {}\n" in to_yaml(config_from_dict(SFTConfig, BASE))
    path = tmp_path / "round.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config("sft", str(path)) == cfg


@pytest.mark.parametrize("overrides, fragments", [
    (["learning_rat=1"], ["unknown key 'learning_rat'", "allowed keys:", "learning_rate", "data.dataset_name"]),
    (["data.shufle_buffer=3"], ["unknown key 'data.shufle_buffer'", "data.shuffle_buffer"]),
    (["learning_rate=fast"], ["learning_rate: expected a number, got 'fast'"]),
    (["max_steps=2.5"], ["max_steps: expected an integer"]),
    (["bf16=maybe"], ["bf16: expected true/false"]),
    (["lr_scheduler_type=greedy"], ["lr_scheduler_type: 'greedy' is not one of",
                                     "'constant', 'constant_with_warmup', 'cosine', 'cosine_with_min_lr'"]),
    (["lr_scheduler_kwargs.power=2"], ["lr_scheduler_kwargs.power: not a parameter of lr_scheduler_type 'linear' "
                                       "(it takes none)"]),
    (["lr_scheduler_type=cosine", "lr_scheduler_kwargs.min_lr=0"],
     ["lr_scheduler_kwargs.min_lr: not a parameter of lr_scheduler_type 'cosine' (it takes num_cycles)"]),
    (["lr_scheduler_kwargs.cycles=2"], ["unknown key 'lr_scheduler_kwargs.cycles'", "lr_scheduler_kwargs.num_cycles"]),
    (["lr_scheduler_type=warmup_stable_decay"],
     ["lr_scheduler_kwargs.num_decay_steps: required by warmup_stable_decay"]),
    (["lr_scheduler_type=warmup_stable_decay", "lr_scheduler_kwargs.num_decay_steps=5",
      "lr_scheduler_kwargs.decay_type=exp"], ["lr_scheduler_kwargs.decay_type: 'exp' is not one of"]),
    (["lr_scheduler_type=cosine_with_min_lr"], ["cosine_with_min_lr needs exactly one of min_lr and min_lr_rate"]),
    (["lr_scheduler_type=polynomial", "lr_scheduler_kwargs.lr_end=1"], ["lr_scheduler_kwargs.lr_end: must be below "
                                                                        "learning_rate"]),
    (["lr_scheduler_type=inverse_sqrt", "lr_scheduler_kwargs.timescale=0"], ["lr_scheduler_kwargs.timescale: "
                                                                             "must be >= 1"]),
    (["data.on_bad_record=ignore"], ["data.on_bad_record: 'ignore' is not one of ['error', 'skip']"]),
    (["truncation_mode=middle"], ["truncation_mode: 'middle' is not one of ['keep_end', 'keep_start']"]),
    (["mesh=4"], ["mesh: is a section", "mesh.data"]),
    (["learning_rate.x=1"], ["learning_rate: is not a section"]),
    (["learning_rate"], ["expected key=value"]),
    (["model.dtype=float16"], ["model.dtype: 'float16' is not one of ['bfloat16', 'float32']"]),
    (["per_device_train_batch_size=0"], ["per_device_train_batch_size: must be >= 1"]),
    (["mesh.data=-1"], ["mesh: at most one of data, fsdp, tensor may be -1"]),
    (["eval_steps=10"], ["eval_steps: needs data.dataset_test_split"]),
    (["data.length_buckets=64,16"], ["data.length_buckets: must be increasing"]),
])
def test_bad_keys_and_values_name_the_key(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        config_from_dict(SFTConfig, BASE, overrides)
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nmodel:\n  name: small\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.name'"):
        load_config("sft", str(bad))
    with pytest.raises(ConfigError, match="output_dir: is required"):
        config_from_dict(SFTConfig, {"data": {"dataset_name": "d"}})
    with pytest.raises(ConfigError, match=r"unknown trainer 'ppo2'; choose one of \['dpo', 'ppo', 'reward', 'sft'"):
        load_config("ppo2")
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config("sft", str(tmp_path / "nope.yaml"))


def test_registry_takes_new_trainers():
    @dataclasses.dataclass(frozen=True)
    class ToyConfig(TrainingConfig):
        beta: float = 0.1
        """A field only this trainer has."""

    register_config("toy", ToyConfig)
    try:
        cfg = load_config("toy", None, ["output_dir=o", "data.dataset_name=d", "beta=0.5"])
        assert isinstance(cfg, ToyConfig) and cfg.beta == 0.5
    finally:
        del CONFIGS["toy"]
