"""The mesh: params sharded over 8 simulated CPU devices give the single-device forward."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hf_builders as hb
from jaxpref.models import VLM, forward, get_preset, load_pretrained
from jaxpref.sharding import batch_sharding, init_sharded, logical_to_spec, make_mesh, param_shardings

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def test_make_mesh_sizes():
    mesh = make_mesh(data=-1, fsdp=4, tensor=2)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="but 8 are available"):
        make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh(data=-1, fsdp=-1)


def test_rules_drop_axes_that_do_not_divide():
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == P(None, "fsdp", "tensor", None)
    # one MQA key/value head cannot split over tensor=2: replicated on that dim
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 1, 16), mesh) == P(None, "fsdp", None, None)
    assert logical_to_spec(("embed",), (6,), mesh) == P(None)


@pytest.mark.parametrize("name,kv", [("llava", 2), ("paligemma", 1)])
def test_sharded_forward_equals_single_device(tmp_path, name, kv):
    cfg = hb.llava_config(kv_heads=kv) if name == "llava" else hb.paligemma_config(kv_heads=kv)
    hb.build(cfg, str(tmp_path))
    model, params = load_pretrained(str(tmp_path))
    n = model.config.num_image_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 250, (8, n + 12)).astype(np.int32)
    ids[:, :n] = model.config.image_token_index
    mask = np.ones_like(ids)
    mask[::3, -4:] = 0
    px = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    fwd = jax.jit(forward, static_argnums=0)
    single = np.asarray(fwd(model, jax.device_put(params, jax.devices()[0]), pixel_values=px, input_ids=ids,
                            attention_mask=mask))

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    _, sparams = load_pretrained(str(tmp_path), mesh=mesh)
    q = sparams["decoder"]["layers"]["q"]["kernel"]  # [L, E, H, D]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)
    assert len({s.device for s in q.addressable_shards}) == 8
    mlp = sparams["vision"]["layers"]["fc1"]["kernel"]  # [L, E, M]
    assert mlp.sharding.spec == P(None, "fsdp", "tensor")
    k = sparams["decoder"]["layers"]["k"]["kernel"]
    assert k.sharding.spec == (P(None, "fsdp", "tensor", None) if kv == 2 else P(None, "fsdp", None, None))

    bs = batch_sharding(mesh)
    sharded = fwd(model, sparams, pixel_values=jax.device_put(px, batch_sharding(mesh, 4)),
                  input_ids=jax.device_put(ids, bs), attention_mask=jax.device_put(mask, bs))
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5, rtol=0)


def test_init_sharded_never_builds_a_full_copy():
    model = VLM(get_preset("tiny"))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = init_sharded(model, jax.random.key(0), mesh)
    want = param_shardings(model, mesh)
    for got, exp in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert got.sharding == exp
    emb = params["decoder"]["embed"]["embedding"]  # [vocab, embed] -> (tensor, fsdp)
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (1024 // 2, 32 // 2)
