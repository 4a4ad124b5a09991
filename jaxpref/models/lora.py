"""LoRA adapters as PEFT defines them, held as a parameter tree of their own beside a frozen base.

    plan = make_plan(config, head, LoraArgs(r=16, alpha=32, target_modules="all-linear"))
    trained = init_adapters(plan, param_shapes(model), rng)   # {"lora": ..., "modules": ...}, float32
    forward(model, Adapted(base, trained, plan), ...)         # the adapted model
    forward(model, Adapted(base, None, plan), ...)            # adapters off: the base (TRL's reference)
    save_adapter(plan, trained, out_dir, base_model_name_or_path="google/paligemma-3b-pt-224")
    plan, trained = load_adapter(adapter_dir, config, head)

Targets are chosen by PEFT's rules on transformers' module names
(`model.language_model.layers.0.self_attn.q_proj`, `model.vision_tower.encoder.layers.0.mlp.fc1`,
`model.multi_modal_projector.linear`, `lm_head`): "all-linear" is every linear layer but the output
head (the vision tower and projector included); a list matches a name equal to an entry or ending
in "." + entry; a single string is a regular expression the whole name must match. Modules in
`modules_to_save` (whole modules, e.g. a reward model's `score`) are trained as full copies instead.

An adapted linear layer computes W x + b + s B(A(dropout(x))) with s = alpha / r (alpha / sqrt(r)
with use_rslora), A [in, r] initialised Kaiming-uniform (U(-1/sqrt(in), 1/sqrt(in)), PEFT's init)
and B [r, out] zeros, so the adapted model starts equal to the base. Over a scanned layer stack
the adapters are stacked too ([L, in, r], [L, r, out]); a target matching only some layers keeps
its other layers' B at zero (masked, so they never train). layers.Dense applies an adapter as two
thin matmuls: no merged copy of a kernel is ever built in a step.

Adapters are float32 whatever the base's dtype (PEFT's autocast), and are cast to the compute dtype
with the base in `variables`. Their shardings follow the kernels they adapt: A's input dim and B's
output dim are split as the kernel's are; the rank dim is whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import ConfigError, VLMConfig
from .hf import DTYPES, CheckpointError, _get, _set, _table

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
HEADS = ("lm_head", "score")  # output heads: never in all-linear


@dataclasses.dataclass(frozen=True)
class LoraArgs:
    """TRL's ModelConfig LoRA fields (names and defaults)."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] | None = None
    use_rslora: bool = False


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted linear layer (or a scanned stack of them)."""

    name: str  # transformers' module name, "{i}" for the layer index of a stacked module
    path: tuple[str, ...]  # the Dense module's path in the params tree
    in_ndim: int  # leading input dims of its kernel (2 for [heads, head_dim, embed])
    layers: tuple[int, ...] | None  # adapted layers of a stacked module; None: not stacked
    num_layers: int | None = None  # the stack's depth


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about a set of adapters: what they adapt and how (hashable: jit-static)."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    targets: tuple[Target, ...]
    saved: tuple[tuple[str, ...], ...]  # param leaf paths trained as full copies (modules_to_save)
    target_modules: tuple[str, ...] | str  # as adapter_config.json records them
    modules_to_save: tuple[str, ...] | None

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# ---------------------------------------------------------------------------
# module names and target selection


@dataclasses.dataclass(frozen=True)
class _Module:
    name: str  # "{i}" for per-layer modules
    paths: tuple[tuple[str, ...], ...]  # param leaves under it (kernel, bias)
    linear: bool
    in_ndim: int = 1
    stacked: bool = False


def _module_name(hf: str) -> str:
    base = hf.rsplit(".", 1)[0]
    return base if base in HEADS else "model." + base


def modules(config: VLMConfig, head: str) -> list[_Module]:
    """The model's modules that own parameters, by transformers' in-memory names."""
    found: dict[str, _Module] = {}
    for e in _table(config, head):
        name = _module_name(e.hf)
        linear = e.kind in ("linear", "bias")
        m = found.get(name)
        paths = (m.paths if m else ()) + (e.path,)
        in_ndim = e.in_ndim if e.kind == "linear" else (m.in_ndim if m else 1)
        found[name] = _Module(name, paths, linear and (m.linear if m else True), in_ndim, "{i}" in name)
    return list(found.values())


def _layers(config: VLMConfig, path: tuple[str, ...]) -> int:
    return config.vision.num_hidden_layers if path[0] == "vision" else config.text.num_hidden_layers


def _names(config: VLMConfig, m: _Module) -> list[tuple[str, int | None]]:
    if not m.stacked:
        return [(m.name, None)]
    return [(m.name.format(i=i), i) for i in range(_layers(config, m.paths[0]))]


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _summary(names) -> str:
    short = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
    return ", ".join(short)


def target_spec(target_modules) -> tuple[str, ...] | str | None:
    """TRL's reading of lora_target_modules: a one-element list is its one string (then a regular
    expression over the whole module name, as PEFT reads a string)."""
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    t = tuple(target_modules)
    return t[0] if len(t) == 1 else t


def make_plan(config: VLMConfig, head: str, args: LoraArgs, extra_modules_to_save: tuple[str, ...] = (),
              strict: bool = True) -> Plan:
    """Which linear layers `args` adapts on this model (PEFT's matching of `args.target_modules`: a
    string, "all-linear" or a regular expression, or a tuple of names; see target_spec for TRL's
    reading of a config's list), and which modules it trains whole. ConfigError when the targets
    match nothing (naming the modules there are) or a layer jaxpref cannot adapt, or when a
    modules_to_save entry names part of a layer stack or (with `strict`) nothing."""
    if args.r < 1:
        raise ConfigError(f"model.lora_r must be >= 1, got {args.r}")
    if not 0 <= args.dropout < 1:
        raise ConfigError(f"model.lora_dropout must be in [0, 1), got {args.dropout}")
    spec = args.target_modules
    mods = modules(config, head)
    linear_names = [n for m in mods if m.linear and m.name not in HEADS for n, _ in _names(config, m)]
    if spec is None:
        raise ConfigError(f"model.lora_target_modules: PEFT has no default for {config.family} models: give "
                          f"'all-linear' or a list of module names ({_summary(linear_names)})")
    all_linear = isinstance(spec, str) and spec.lower() == "all-linear"

    to_save = tuple(args.modules_to_save or ()) + tuple(m for m in extra_modules_to_save
                                                        if m not in (args.modules_to_save or ()))
    saved: list[tuple[str, ...]] = []
    saved_modules: set[str] = set()
    for want in to_save:
        hit = False
        for m in mods:
            names = _names(config, m)
            inside = [any(_matches(".".join(n.split(".")[:k]), (want,)) for k in range(1, len(n.split(".")) + 1))
                      for n, _ in names]
            if not any(inside):
                continue
            if not all(inside):
                raise ConfigError(f"model.lora_modules_to_save: {want!r} matches {sum(inside)} of the {len(names)} "
                                  f"layers of {m.name.format(i='N')}; jaxpref trains a layer stack's module whole")
            if m.name == "lm_head" and config.text.tie_word_embeddings:
                raise ConfigError("model.lora_modules_to_save: lm_head is tied to embed_tokens in this model")
            hit = True
            saved.extend(m.paths)
            saved_modules.add(m.name)
        if not hit and strict:
            raise ConfigError(f"model.lora_modules_to_save: {want!r} matches no module; modules: "
                              f"{_summary(n for m in mods for n, _ in _names(config, m))}")

    targets: list[Target] = []
    matched_names: list[str] = []
    for m in mods:
        if m.name in saved_modules:
            continue
        hits = [(n, i) for n, i in _names(config, m)
                if ((m.linear and m.name not in HEADS) if all_linear else _matches(n, spec))]
        if not hits:
            continue
        if not m.linear:
            raise ConfigError(f"model.lora_target_modules: {hits[0][0]} is not a linear layer; jaxpref adapts "
                              f"linear layers only ({_summary(linear_names)})")
        kernel = next(p for p in m.paths if p[-1] == "kernel")
        layers = tuple(i for _, i in hits) if m.stacked else None
        targets.append(Target(m.name, kernel[:-1], m.in_ndim, layers,
                              _layers(config, kernel) if m.stacked else None))
        matched_names += [n for n, _ in hits]
    if not targets:
        raise ConfigError(f"model.lora_target_modules: target modules {spec!r} not found in the model (a list "
                          f"matches a name equal to an entry or ending in '.' + entry; a single name is a "
                          f"regular expression over the whole name). Linear modules: {_summary(linear_names)}")
    recorded = tuple(sorted({n.rsplit(".", 1)[-1] for n in matched_names})) if all_linear else spec
    return Plan(r=args.r, alpha=float(args.alpha), dropout=float(args.dropout), use_rslora=args.use_rslora,
                targets=tuple(targets), saved=tuple(saved), target_modules=recorded,
                modules_to_save=to_save or None)


def without_vision(plan: Plan) -> Plan:
    """`plan` with no adapters in the vision tower (a frozen tower). When that drops any, the recorded
    target_modules become one regular expression naming exactly the modules kept, so the saved
    adapter_config.json selects the same modules in PEFT and in load_adapter."""
    kept = tuple(t for t in plan.targets if t.path[0] != "vision")
    if not kept:
        raise ConfigError("model.lora_target_modules: every target is in the vision tower, which "
                          "model.freeze_vision keeps frozen")
    if kept == plan.targets:
        return plan

    def pattern(t: Target) -> str:
        name = re.escape(t.name)
        if t.layers is None:
            return name
        layers = r"\d+" if len(t.layers) == t.num_layers else "(?:" + "|".join(map(str, t.layers)) + ")"
        return name.replace(re.escape("{i}"), layers)

    return dataclasses.replace(plan, targets=kept, target_modules="|".join(pattern(t) for t in kept))


# ---------------------------------------------------------------------------
# the adapter tree


def _replace(tree: dict, path, value) -> dict:
    """A copy of `tree` with the leaf at `path` replaced (the dicts along the path copied, nothing else)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replace(tree[path[0]], path[1:], value)
    return out


def _dims(t: Target, kernel_shape) -> tuple[int, int]:
    lead = 1 if t.layers is not None else 0
    shape = kernel_shape[lead:]
    return math.prod(shape[:t.in_ndim]), math.prod(shape[t.in_ndim:])


def adapter_shapes(plan: Plan, base_shapes) -> dict:
    """ShapeDtypeStructs of the trained tree: {"lora": {<module path>: {"lora_a", "lora_b"}},
    "modules": {<param path>: float32 copy}}."""
    out: dict = {"lora": {}, "modules": {}}
    for t in plan.targets:
        k = _get(base_shapes, t.path + ("kernel",))
        fan_in, fan_out = _dims(t, k.shape)
        lead = (k.shape[0],) if t.layers is not None else ()
        _set(out["lora"], t.path + ("lora_a",), jax.ShapeDtypeStruct(lead + (fan_in, plan.r), jnp.float32))
        _set(out["lora"], t.path + ("lora_b",), jax.ShapeDtypeStruct(lead + (plan.r, fan_out), jnp.float32))
    for p in plan.saved:
        _set(out["modules"], p, jax.ShapeDtypeStruct(_get(base_shapes, p).shape, jnp.float32))
    return out


def adapter_shardings(plan: Plan, base_shardings) -> dict:
    """NamedShardings of the trained tree: A's input dim and B's output dim as the adapted kernel's
    (the major one of merged dims), the rank dim whole; a module copy as its base leaf."""
    out: dict = {"lora": {}, "modules": {}}
    for t in plan.targets:
        ks = _get(base_shardings, t.path + ("kernel",))
        spec = tuple(ks.spec) + (None,) * 8
        lead = (spec[0],) if t.layers is not None else ()
        n = len(lead)
        _set(out["lora"], t.path + ("lora_a",), NamedSharding(ks.mesh, P(*lead, spec[n], None)))
        _set(out["lora"], t.path + ("lora_b",), NamedSharding(ks.mesh, P(*lead, None, spec[n + t.in_ndim])))
    for p in plan.saved:
        _set(out["modules"], p, _get(base_shardings, p))
    return out


def init_adapters(plan: Plan, base, rng) -> dict:
    """The trained tree at step 0 (PEFT's init): A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, modules to
    save copied from `base` (arrays or, for the A/B shapes alone, ShapeDtypeStructs) as float32."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), adapter_shapes(plan, shapes))
    for j, t in enumerate(plan.targets):
        a = _get(out["lora"], t.path + ("lora_a",))
        bound = 1.0 / math.sqrt(a.shape[-2])
        _set(out["lora"], t.path + ("lora_a",),
             jax.random.uniform(jax.random.fold_in(rng, j), a.shape, jnp.float32, -bound, bound))
    for p in plan.saved:
        _set(out["modules"], p, jnp.asarray(_get(base, p), jnp.float32))
    return out


@flax.struct.dataclass
class Adapted:
    """A frozen base with adapters: what forward, the sampler and the losses take as `params` under
    LoRA. trained=None is the base alone (adapters and module copies off)."""

    base: Any
    trained: Any
    plan: Plan = flax.struct.field(pytree_node=False)
    rng: Any = None  # uint32[2] key data: the adapters' input dropout draws from it (training); None: no dropout


def _cast(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _layer_mask(t: Target):
    if t.layers is None or len(t.layers) == t.num_layers:
        return None
    return np.isin(np.arange(t.num_layers), t.layers).astype(np.float32)[:, None, None]


def effective_lora(plan: Plan, lora: dict) -> dict:
    """The "lora" collection layers.Dense reads: B scaled by s (and zero on layers not adapted)."""
    out: dict = {}
    for t in plan.targets:
        b = _get(lora, t.path + ("lora_b",)) * plan.scale
        mask = _layer_mask(t)
        _set(out, t.path + ("lora_a",), _get(lora, t.path + ("lora_a",)))
        _set(out, t.path + ("lora_b",), b if mask is None else b * mask)
    return out


def variables(params, dtype=None) -> dict:
    """The variables `model.apply` takes for `params` (a params tree, or Adapted), floating leaves
    cast to `dtype` (None: as they are)."""
    if not isinstance(params, Adapted):
        return {"params": _cast(params, dtype)}
    base = params.base
    if params.trained is None:
        return {"params": _cast(base, dtype)}
    for p in params.plan.saved:
        base = _replace(base, p, _get(params.trained["modules"], p).astype(_get(base, p).dtype))
    return {"params": _cast(base, dtype), "lora": _cast(effective_lora(params.plan, params.trained["lora"]), dtype)}


def rngs(params) -> dict:
    """The rngs `model.apply` takes for `params`: {"dropout": key} while adapters train with dropout."""
    if isinstance(params, Adapted) and params.rng is not None and params.trained is not None and params.plan.dropout > 0:
        return {"dropout": jax.random.wrap_key_data(params.rng)}
    return {}


def base_of(params):
    """The base model's params under `params` (itself when it is not Adapted)."""
    return params.base if isinstance(params, Adapted) else params


# ---------------------------------------------------------------------------
# PEFT's on-disk format


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_config(plan: Plan, base_model_name_or_path: str | None, task_type: str | None = "CAUSAL_LM") -> dict:
    """adapter_config.json as PEFT writes it for a LoraConfig (the fields a LoRA adapter uses)."""
    tm = plan.target_modules
    return {
        "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": plan.alpha, "lora_bias": False,
        "lora_dropout": plan.dropout, "modules_to_save": list(plan.modules_to_save) if plan.modules_to_save else None,
        "peft_type": "LORA", "r": plan.r, "rank_pattern": {}, "revision": None,
        "target_modules": tm if isinstance(tm, str) else list(tm), "target_parameters": None,
        "task_type": task_type, "use_dora": False, "use_rslora": plan.use_rslora,
    }


def _module_leaf_name(config: VLMConfig, head: str, path: tuple[str, ...]) -> list[tuple[str, int | None, Any]]:
    """(file name, layer, entry) of a params leaf, as PEFT stores a modules_to_save copy."""
    for e in _table(config, head):
        if e.path == path:
            names = ([(e.hf.format(i=i), i) for i in range(_layers(config, path))] if "{i}" in e.hf else [(e.hf, None)])
            return [(PEFT_PREFIX + (n if n.split(".")[0] in HEADS else "model." + n), i, e) for n, i in names]
    raise KeyError(path)


def adapter_tensors(plan: Plan, trained, config: VLMConfig, head: str, dtype=np.float32) -> dict[str, np.ndarray]:
    """The tensors of adapter_model.safetensors, by PEFT's names (torch layouts: A [r, in], B [out, r])."""
    from .hf import _to_theirs

    trained = jax.device_get(trained)
    out: dict[str, np.ndarray] = {}
    for t in plan.targets:
        a = np.asarray(_get(trained["lora"], t.path + ("lora_a",)), np.float32)
        b = np.asarray(_get(trained["lora"], t.path + ("lora_b",)), np.float32)
        for i in (t.layers if t.layers is not None else (None,)):
            name = PEFT_PREFIX + (t.name.format(i=i) if i is not None else t.name)
            ai, bi = (a, b) if i is None else (a[i], b[i])
            out[name + ".lora_A.weight"] = np.ascontiguousarray(ai.T.astype(dtype))
            out[name + ".lora_B.weight"] = np.ascontiguousarray(bi.T.astype(dtype))
    for p in plan.saved:
        arr = np.asarray(_get(trained["modules"], p), np.float32)
        for name, i, e in _module_leaf_name(config, head, p):
            out[name] = np.ascontiguousarray(_to_theirs(e, arr if i is None else arr[i]).astype(dtype))
    return out


def save_adapter(plan: Plan, trained, config: VLMConfig, head: str, out_dir: str, *,
                 base_model_name_or_path: str | None, task_type: str | None = "CAUSAL_LM") -> str:
    """Writes adapter_config.json + adapter_model.safetensors as `PeftModel.save_pretrained` does:
    `peft.PeftModel.from_pretrained(transformers_model, out_dir)` loads it."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(adapter_tensors(plan, trained, config, head), os.path.join(out_dir, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(plan, base_model_name_or_path, task_type), f, indent=2, sort_keys=True)
    return out_dir


def read_adapter_config(path: str) -> dict:
    p = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(p) as f:
            c = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: cannot read the adapter config: {e}") from None
    if c.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{p}: peft_type {c.get('peft_type')!r}: jaxpref reads LoRA adapters only")
    for key, off in (("use_dora", False), ("rank_pattern", {}), ("alpha_pattern", {}), ("fan_in_fan_out", False),
                     ("lora_bias", False), ("target_parameters", None), ("layers_to_transform", None)):
        if c.get(key) is not None and c[key] != off:
            raise CheckpointError(f"{p}: {key}={c[key]!r} is not supported by jaxpref's LoRA")
    if c.get("bias", "none") != "none":
        raise CheckpointError(f"{p}: bias={c['bias']!r} is not supported by jaxpref's LoRA (only 'none')")
    return c


def load_adapter(path: str, config: VLMConfig, head: str, dtype: str = "float32") -> tuple[Plan, dict]:
    """(plan, trained tree as numpy float32) of a PEFT LoRA adapter directory, for a model of `config`.
    CheckpointError naming the file and tensor when one is missing or has the wrong shape."""
    from safetensors import safe_open

    from .hf import _to_ours
    from ..sharding import param_shapes
    from .vlm import VLM

    c = read_adapter_config(path)
    tm = c.get("target_modules")
    args = LoraArgs(r=int(c["r"]), alpha=c.get("lora_alpha", 8), dropout=c.get("lora_dropout", 0.0),
                    target_modules=tm if isinstance(tm, str) or tm is None else tuple(tm),
                    modules_to_save=tuple(c["modules_to_save"]) if c.get("modules_to_save") else None,
                    use_rslora=bool(c.get("use_rslora", False)))
    # a saved list is matched as a list even with one entry (PEFT's reading of its own file); modules to
    # save that match nothing here (PEFT's ["classifier", "score"] of a classifier) are skipped, as PEFT does
    plan = make_plan(config, head, args, strict=False)
    wfile = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.exists(wfile):
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS} (jaxpref reads safetensors only)")
    shapes = param_shapes(VLM(config, head=head, dtype=jnp.dtype(DTYPES[dtype])))
    want = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), adapter_shapes(plan, shapes))
    with safe_open(wfile, framework="numpy") as f:
        have = {k.replace(".default.", "."): k for k in f.keys()}
        expected = adapter_tensors(plan, want, config, head)  # names and torch-layout shapes

        def read(name):
            if name not in have:
                raise CheckpointError(f"{wfile}: missing tensor {name} (adapter_config.json targets "
                                      f"{args.target_modules!r})")
            t = f.get_tensor(have[name]).astype(np.float32)
            if t.shape != expected[name].shape:
                raise CheckpointError(f"{wfile}: {name} has shape {t.shape}, expected {expected[name].shape}")
            return t

        for t in plan.targets:
            a = _get(want["lora"], t.path + ("lora_a",))
            b = _get(want["lora"], t.path + ("lora_b",))
            for i in (t.layers if t.layers is not None else (None,)):
                name = PEFT_PREFIX + (t.name.format(i=i) if i is not None else t.name)
                if i is None:
                    a[...], b[...] = read(name + ".lora_A.weight").T, read(name + ".lora_B.weight").T
                else:
                    a[i], b[i] = read(name + ".lora_A.weight").T, read(name + ".lora_B.weight").T
        for p in plan.saved:
            arr = _get(want["modules"], p)
            for name, i, e in _module_leaf_name(config, head, p):
                v = _to_ours(e, read(name), arr.shape if i is None else arr.shape[1:])
                if i is None:
                    arr[...] = v
                else:
                    arr[i] = v
    return plan, want


def merge(plan: Plan, base, trained) -> dict:
    """The base params with the adapters folded in (W + s A B per kernel, module copies in place), as
    numpy: what `jaxpref export --merge` writes."""
    base = jax.device_get(base)
    trained = jax.device_get(trained)
    out = jax.tree.map(np.asarray, base)
    lora = jax.tree.map(np.asarray, effective_lora(plan, trained["lora"]))
    for t in plan.targets:
        k = _get(out, t.path + ("kernel",))
        a = _get(lora, t.path + ("lora_a",)).astype(np.float32)
        b = _get(lora, t.path + ("lora_b",)).astype(np.float32)
        delta = a @ b  # [L?, in, out]
        _set(out, t.path + ("kernel",), (k.astype(np.float32) + delta.reshape(k.shape)).astype(k.dtype))
    for p in plan.saved:
        leaf = _get(out, p)
        _set(out, p, np.asarray(_get(trained["modules"], p)).astype(leaf.dtype))
    return out


__all__ = ["LoraArgs", "Plan", "Target", "Adapted", "make_plan", "init_adapters", "adapter_shapes",
           "adapter_shardings", "variables", "effective_lora", "save_adapter", "load_adapter", "merge",
           "is_adapter_dir", "read_adapter_config", "adapter_config", "adapter_tensors", "target_spec", "base_of", "rngs",
           "without_vision"]
