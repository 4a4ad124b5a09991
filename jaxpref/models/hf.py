"""Hugging Face checkpoints in and out: safetensors <-> jaxpref params.

Reads `config.json` plus `model.safetensors` or a sharded `model.safetensors.index.json`, in
any of the name layouts transformers reads (`language_model.model.*` as `save_pretrained`
writes by default, `model.language_model.*` in-memory names, `vision_tower.vision_model.*` as
hub checkpoints often carry). Writes the default layout, which
`transformers.AutoModelForImageTextToText.from_pretrained` loads back.

PyTorch Linear weights are [out, in]; jaxpref kernels are [in, ...out] with heads split out,
and per-layer tensors are stacked on a leading `layers` axis (the scanned stack).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..sharding import param_shapes, param_shardings
from .config import VLMConfig, read_hf_config, to_hf_config
from .vlm import VLM

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SAFETENSORS_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}


class CheckpointError(ValueError):
    """A checkpoint directory jaxpref cannot load: missing files, tensors or wrong shapes."""


# ---------------------------------------------------------------------------
# name table


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # canonical HF name; "{i}" marks a per-layer tensor
    path: tuple[str, ...]  # path in the jaxpref params tree
    kind: str  # "linear" (kernel), "bias", "copy", "patch", "lm_head"
    in_ndim: int = 1  # leading input dims of a kernel (2 for output projections [H, D, E])


def _table(cfg: VLMConfig, head: str) -> list[Entry]:
    e: list[Entry] = []
    V = ("vision",)
    vl = V + ("layers",)
    if cfg.vision.kind == "siglip":
        e.append(Entry("vision_tower.embeddings.patch_embedding.bias", V + ("patch_bias",), "copy"))
    else:
        e.append(Entry("vision_tower.embeddings.class_embedding", V + ("class_embedding",), "copy"))
        e += [Entry(f"vision_tower.pre_layrnorm.{w}", V + ("pre_ln", n), "copy") for w, n in (("weight", "scale"), ("bias", "bias"))]
    e.append(Entry("vision_tower.embeddings.patch_embedding.weight", V + ("patch_kernel",), "patch"))
    e.append(Entry("vision_tower.embeddings.position_embedding.weight", V + ("pos_embedding",), "copy"))
    for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
        e.append(Entry(f"vision_tower.encoder.layers.{{i}}.{theirs}.weight", vl + (ours, "scale"), "copy"))
        e.append(Entry(f"vision_tower.encoder.layers.{{i}}.{theirs}.bias", vl + (ours, "bias"), "copy"))
    for ours, theirs, in_ndim in (("q", "self_attn.q_proj", 1), ("k", "self_attn.k_proj", 1), ("v", "self_attn.v_proj", 1),
                                  ("o", "self_attn.out_proj", 2), ("fc1", "mlp.fc1", 1), ("fc2", "mlp.fc2", 1)):
        e.append(Entry(f"vision_tower.encoder.layers.{{i}}.{theirs}.weight", vl + (ours, "kernel"), "linear", in_ndim))
        e.append(Entry(f"vision_tower.encoder.layers.{{i}}.{theirs}.bias", vl + (ours, "bias"), "bias"))
    e += [Entry(f"vision_tower.post_layernorm.{w}", V + ("post_ln", n), "copy") for w, n in (("weight", "scale"), ("bias", "bias"))]
    projs = (("projector", "linear"),) if cfg.projector == "linear" else (("projector_1", "linear_1"), ("projector_2", "linear_2"))
    for ours, theirs in projs:
        e.append(Entry(f"multi_modal_projector.{theirs}.weight", (ours, "kernel"), "linear"))
        e.append(Entry(f"multi_modal_projector.{theirs}.bias", (ours, "bias"), "bias"))
    D = ("decoder",)
    dl = D + ("layers",)
    e.append(Entry("language_model.embed_tokens.weight", D + ("embed", "embedding"), "copy"))
    e.append(Entry("language_model.norm.weight", D + ("final_norm", "scale"), "copy"))
    e.append(Entry("language_model.layers.{i}.input_layernorm.weight", dl + ("input_norm", "scale"), "copy"))
    e.append(Entry("language_model.layers.{i}.post_attention_layernorm.weight", dl + ("post_attn_norm", "scale"), "copy"))
    for ours, theirs, in_ndim in (("q", "self_attn.q_proj", 1), ("k", "self_attn.k_proj", 1), ("v", "self_attn.v_proj", 1),
                                  ("o", "self_attn.o_proj", 2), ("gate", "mlp.gate_proj", 1), ("up", "mlp.up_proj", 1),
                                  ("down", "mlp.down_proj", 1)):
        e.append(Entry(f"language_model.layers.{{i}}.{theirs}.weight", dl + (ours, "kernel"), "linear", in_ndim))
    if head == "lm" and not cfg.text.tie_word_embeddings:
        e.append(Entry("lm_head.weight", ("lm_head", "kernel"), "linear"))
    if head == "scalar":
        e.append(Entry("score.weight", ("score", "kernel"), "linear"))
    return e


_ALIASES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.language_model\."), "language_model."),  # in-memory names
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^language_model\.model\."), "language_model."),  # default on-disk names
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),  # hub checkpoints
]


def canonical_name(name: str) -> str:
    for pat, rep in _ALIASES:
        name = pat.sub(rep, name)
    return name


def _on_disk_name(cfg: VLMConfig, canonical: str) -> str:
    """The name transformers' save_pretrained writes by default (the "original" layout)."""
    if canonical.startswith("language_model."):
        return "language_model.model." + canonical[len("language_model."):]
    if canonical == "lm_head.weight":
        return "language_model.lm_head.weight"
    return canonical


# ---------------------------------------------------------------------------
# conversions


def _to_ours(entry: Entry, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if entry.kind == "linear":
        return t.T.reshape(shape)
    if entry.kind == "patch":  # [out, 3, p, p] -> [p, p, 3, out]
        return t.transpose(2, 3, 1, 0)
    return t.reshape(shape)


def _to_theirs(entry: Entry, a: np.ndarray) -> np.ndarray:
    if entry.kind == "linear":
        n_in = int(np.prod(a.shape[: entry.in_ndim]))
        return a.reshape(n_in, -1).T
    if entry.kind == "patch":
        return a.transpose(3, 2, 0, 1)
    if entry.kind == "bias":
        return a.reshape(-1)
    return a


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------
# reading safetensors


class _TensorReader:
    """Reads tensors by canonical name from one or several safetensors files (lazily, to host numpy)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                  f"(jaxpref reads safetensors only, never pickled .bin files)")
        self.path = path
        self._handles = {}
        self._where: dict[str, tuple[str, str]] = {}  # canonical -> (file, original name)
        for fname in files:
            fp = os.path.join(path, fname)
            if not os.path.exists(fp):
                raise CheckpointError(f"{path}: the index names shard {fname}, which is missing")
            h = safe_open(fp, framework="numpy")
            self._handles[fname] = h
            for k in h.keys():
                self._where[canonical_name(k)] = (fname, k)

    def names(self) -> set[str]:
        return set(self._where)

    def has(self, canonical: str) -> bool:
        return canonical in self._where

    def shape(self, canonical: str) -> tuple[int, ...]:
        fname, k = self._where[canonical]
        return tuple(self._handles[fname].get_slice(k).get_shape())

    def get(self, canonical: str, dtype) -> np.ndarray:
        fname, k = self._where[canonical]
        return np.asarray(self._handles[fname].get_tensor(k)).astype(dtype)


def _expected_hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), shape=shape, strides=(0,) * len(shape))
    return tuple(_to_theirs(entry, dummy).shape)


def load_pretrained(path: str, dtype: str = "float32", *, head: str = "lm", mesh=None, remat: bool = False,
                    rng=None):
    """(model, params) from a Hugging Face PaliGemma or LLaVA directory.

    dtype: "float32" | "bfloat16" (params and compute). head="scalar" builds a reward/value
    model on the same backbone: the LM head is dropped and the score head comes from the
    checkpoint if it has one (`score.weight`, as jaxpref saves it), else is initialised
    from `rng` with std 1/sqrt(hidden + 1), as TRL's reward models are. With `mesh`, each
    tensor is placed directly onto its shards (no full copy on one device).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg = read_hf_config(path)
    jdtype = jnp.dtype(DTYPES[dtype])
    model = VLM(cfg, head=head, dtype=jdtype, remat=remat)
    shapes = param_shapes(model)
    reader = _TensorReader(path)
    table = _table(cfg, head)
    L = {"vision": cfg.vision.num_hidden_layers, "decoder": cfg.text.num_hidden_layers}

    missing, misshapen, used = [], [], set()
    for ent in table:
        if ent.hf == "score.weight" and not reader.has(ent.hf):
            continue
        shape = _get(shapes, ent.path).shape
        names = [ent.hf.format(i=i) for i in range(L[ent.path[0]])] if "{i}" in ent.hf else [ent.hf]
        per = shape[1:] if "{i}" in ent.hf else shape
        want = _expected_hf_shape(ent, per)
        for n in names:
            if not reader.has(n):
                missing.append(_on_disk_name(cfg, n))
            elif reader.shape(n) != want:
                misshapen.append(f"{_on_disk_name(cfg, n)}: expected {want}, found {reader.shape(n)}")
    if missing or misshapen:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing tensor(s): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if misshapen:
            lines.append(f"{len(misshapen)} tensor(s) with the wrong shape for config.json: " + "; ".join(misshapen[:10]))
        raise CheckpointError(f"{path}: " + "\n".join(lines))

    shardings = param_shardings(model, mesh) if mesh is not None else None
    params: dict = {}
    for ent in table:
        if ent.hf == "score.weight" and not reader.has(ent.hf):
            continue
        shape = _get(shapes, ent.path).shape
        if "{i}" in ent.hf:
            n_layers = L[ent.path[0]]
            arr = np.stack([_to_ours(ent, reader.get(ent.hf.format(i=i), jdtype), shape[1:]) for i in range(n_layers)])
            used.update(ent.hf.format(i=i) for i in range(n_layers))
        else:
            arr = _to_ours(ent, reader.get(ent.hf, jdtype), shape)
            used.add(ent.hf)
        sh = _get(shardings, ent.path) if shardings is not None else None
        _set(params, ent.path, jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr))
    if head == "scalar" and "score" not in params:
        e = cfg.text.hidden_size
        rng = jax.random.key(0) if rng is None else rng
        w = (jax.random.normal(rng, (e, 1), jnp.float32) / math.sqrt(e + 1)).astype(jdtype)
        sh = _get(shardings, ("score", "kernel")) if shardings is not None else None
        params["score"] = {"kernel": jax.device_put(w, sh) if sh is not None else w}
    ignored = sorted(reader.names() - used - {"lm_head.weight"})
    if ignored:
        log.warning("%s: ignored %d tensor(s) jaxpref does not use: %s", path, len(ignored), ", ".join(ignored[:8]))
    return model, params


def save_pretrained(model: VLM, params, out_dir: str, *, max_shard_bytes: int = 4 << 30,
                    dtype: str | None = None) -> str:
    """Writes config.json + safetensors (sharded with an index above max_shard_bytes).

    The layout is transformers' default, so `AutoModelForImageTextToText.from_pretrained(out_dir)`
    loads it. A scalar-head model also writes `score.weight` [1, hidden] (jaxpref reads it back).
    """
    from safetensors.numpy import save_file

    cfg = model.config
    out_dtype = jnp.dtype(DTYPES[dtype]) if dtype else jnp.dtype(model.dtype)
    os.makedirs(out_dir, exist_ok=True)
    L = {"vision": cfg.vision.num_hidden_layers, "decoder": cfg.text.num_hidden_layers}
    tensors: dict[str, np.ndarray] = {}
    for ent in _table(cfg, model.head):
        arr = np.asarray(jax.device_get(_get(params, ent.path))).astype(out_dtype)
        if "{i}" in ent.hf:
            for i in range(L[ent.path[0]]):
                tensors[_on_disk_name(cfg, ent.hf.format(i=i))] = np.ascontiguousarray(_to_theirs(ent, arr[i]))
        else:
            tensors[_on_disk_name(cfg, ent.hf)] = np.ascontiguousarray(_to_theirs(ent, arr))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for j, shard in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg, dtype=str(out_dtype)), f, indent=2)
    return out_dir


__all__ = ["load_pretrained", "save_pretrained", "CheckpointError", "canonical_name", "param_shapes"]
