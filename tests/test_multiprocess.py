"""Two real processes (jax.distributed on localhost) run one sharded forward pass."""

import numpy as np
import pytest

from multiproc import run_processes


def _batch(cfg, b=4):
    rng = np.random.default_rng(0)
    n = cfg.num_image_tokens
    ids = rng.integers(5, 1000, (b, n + 6)).astype(np.int32)
    ids[:, :n] = cfg.image_token_index
    px = rng.standard_normal((b, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return px, ids, np.ones_like(ids)


def forward_worker(process_id: int):
    """Each process holds half the batch; params fsdp-sharded across both processes' devices."""
    import jax

    from jaxpref.models import VLM, forward, get_preset
    from jaxpref.sharding import batch_sharding, init_sharded, make_mesh

    assert jax.process_count() == 2 and jax.device_count() == 4
    model = VLM(get_preset("tiny"))
    mesh = make_mesh(data=2, fsdp=2, tensor=1)
    params = init_sharded(model, jax.random.key(0), mesh)
    px, ids, mask = _batch(model.config)
    half = slice(2 * process_id, 2 * process_id + 2)  # this process's rows
    g = lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x[half])
    logits = jax.jit(forward, static_argnums=0)(model, params, pixel_values=g(px), input_ids=g(ids),
                                                attention_mask=g(mask))
    local = np.concatenate([np.asarray(s.data) for s in sorted(logits.addressable_shards, key=lambda s: s.index[0].start)
                            if s.replica_id == 0])
    return {"rows": [half.start, half.stop], "logits": local[:, -3:].tolist()}


@pytest.mark.multiprocess
def test_two_processes_equal_one():
    import jax

    from jaxpref.models import VLM, forward, get_preset, init_params

    results = run_processes("test_multiprocess:forward_worker", n=2, devices_per_process=2)
    model = VLM(get_preset("tiny"))
    params = init_params(model, jax.random.key(0))
    px, ids, mask = _batch(model.config)
    ref = np.asarray(forward(model, params, pixel_values=px, input_ids=ids, attention_mask=mask))
    for r in results:
        lo, hi = r["rows"]
        np.testing.assert_allclose(np.asarray(r["logits"]), ref[lo:hi, -3:], atol=1e-5, rtol=0)
