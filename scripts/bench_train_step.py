"""One training step, jaxpref's trainer against transformers' PyTorch model on the same weights and batch.

    .venv/bin/python scripts/bench_train_step.py [--cases sft,reward] [--iters 3]

jaxpref: the trainer's own jitted step (jaxpref.train.program.build_program from the built-in task's
recipe, float32, no remat), its parameters from jaxpref.models.init_params (seed 0). transformers:
PaliGemmaForConditionalGeneration loaded from the same weights (save_pretrained), one forward with
the loss, backward and torch.optim.AdamW step; the reward case reads the decoder's last hidden state
through a linear score head (what jaxpref's scalar head is). Same shapes, same random batch, the tower
frozen on both sides as the recipes freeze it. Each side: best of --iters steps after one warm-up step,
the two sides interleaved round by round. torch uses every core (torch.get_num_threads()).

Cases (the `small` preset, one 64x64 image = 64 image tokens a row):
  sft     16 rows: prompt 80 + completion 64 tokens, loss on the completion
  reward  16 pairs: prompt 80 + chosen / rejected 16 tokens, both sequences in one forward (32 rows)
  dpo     16 pairs: prompt 80 + chosen / rejected 16 tokens, against a frozen reference (the same
          weights). The PyTorch side is what TRL's DPOTrainer computes per step, written out here rather
          than run through the trainer: its concatenated forward (chosen and rejected stacked on the batch
          axis, each image repeated), the reference's forward under no_grad, the completion log-prob
          sums, the sigmoid loss, backward and AdamW.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxpref.models import VLM, get_preset, init_params, save_pretrained  # noqa: E402
from jaxpref.profile import concrete  # noqa: E402
from jaxpref.sharding import make_mesh  # noqa: E402
from jaxpref.train.program import build_program, load_recipe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"sft": ("sft", 16, 80, 64), "reward": ("reward", 16, 80, 16), "dpo": ("dpo", 16, 80, 16)}


def jaxpref_step(kind: str, rows: int, lp: int, lc: int):
    """(step() running one jitted step, the model and its params, the batch as numpy)."""
    recipe = os.path.join(ROOT, "jaxpref", "tasks", "shapes", "configs", f"{kind}.yaml")
    _, cfg = load_recipe(recipe, ["model.name_or_path=small", "output_dir=/tmp/unused", "data.dataset_name=unused",
                                  f"per_device_train_batch_size={rows}", "gradient_accumulation_steps=1",
                                  "bf16=false", "gradient_checkpointing=false", "model.freeze_vision=true",
                                  *(["precompute_ref_log_probs=false", "loss_type=sigmoid"] if kind == "dpo" else [])])
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    prog = build_program(kind, cfg, mesh, prompt_length=lp, completion_length=lc)
    state = concrete(prog.args[0])  # AdamW's initial state is zeros: only the params need values
    model = VLM(get_preset("small"), head="scalar" if kind == "reward" else "lm")
    params = init_params(model, jax.random.key(0))
    copy = lambda tree, like: jax.tree.map(lambda x, s: jax.device_put(np.array(x), s.sharding), tree, like)  # noqa: E731
    state = state.replace(params=copy(params, state.params))  # own buffers: the step donates them
    rng = np.random.default_rng(0)
    batch = {}
    for k, s in prog.args[1].items():
        if k == "pixel_values":
            batch[k] = rng.uniform(-1, 1, s.shape).astype(np.float32)
        elif k.endswith("_ids"):
            batch[k] = rng.integers(5, model.config.text.vocab_size, s.shape).astype(np.int32)
        else:
            batch[k] = np.ones(s.shape, s.dtype)
    n = model.config.num_image_tokens
    batch["prompt_ids"][..., :n] = model.config.image_token_index
    batch["prompt_ids"][..., n] = model.config.bos_token_id
    compiled = prog.fn.lower(*prog.args).compile()
    args = [state, jax.device_put(batch, jax.tree.map(lambda s: s.sharding, prog.args[1]))]
    if kind == "dpo":  # the frozen reference: the same weights
        args.append(copy(params, prog.args[2]))

    def step():
        args[0], metrics = compiled(*args)
        jax.block_until_ready(metrics)

    return step, model, params, {k: v[0] for k, v in batch.items()}


def hf_step(kind: str, model: VLM, params, batch: dict, lp: int):
    from transformers import PaliGemmaForConditionalGeneration

    d = tempfile.mkdtemp()
    save_pretrained(model.clone(head="lm"), {k: v for k, v in params.items() if k != "score"}, d)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32)
    hf.train()
    for p in hf.model.vision_tower.parameters():
        p.requires_grad_(False)
    px = torch.from_numpy(batch["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy())
    if kind == "sft":
        ids = torch.from_numpy(np.concatenate([batch["prompt_ids"], batch["completion_ids"]], 1)).long()
        labels = ids.clone()
        labels[:, :lp] = -100
        tt = torch.cat([torch.zeros(ids.shape[0], lp, dtype=torch.long),
                        torch.ones(ids.shape[0], ids.shape[1] - lp, dtype=torch.long)], 1)
        params_trained = [p for p in hf.parameters() if p.requires_grad]

        def loss():
            return hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px, token_type_ids=tt,
                      labels=labels).loss
    elif kind == "dpo":
        ref = PaliGemmaForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32).eval()
        seqs = [np.concatenate([batch["prompt_ids"], batch[f"{c}_ids"]], 1) for c in ("chosen", "rejected")]
        ids = torch.from_numpy(np.concatenate(seqs, 0)).long()  # TRL: chosen rows, then rejected rows
        px2 = torch.cat([px, px], 0)
        tt = torch.cat([torch.zeros(ids.shape[0], lp, dtype=torch.long),
                        torch.ones(ids.shape[0], ids.shape[1] - lp, dtype=torch.long)], 1)
        mask = tt[:, 1:].float()
        params_trained = [p for p in hf.parameters() if p.requires_grad]

        def logps(m):
            logits = m(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px2, token_type_ids=tt).logits
            lp_tok = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
            s = (lp_tok * mask).sum(-1)
            return s[:len(s) // 2], s[len(s) // 2:]

        def loss():
            with torch.no_grad():
                rc, rr = logps(ref)
            c, r = logps(hf)
            return -torch.nn.functional.logsigmoid(0.1 * ((c - rc) - (r - rr))).mean()
    else:
        seqs = [np.concatenate([batch["prompt_ids"], batch[f"{c}_ids"]], 1) for c in ("chosen", "rejected")]
        ids = torch.from_numpy(np.stack(seqs, 1).reshape(-1, seqs[0].shape[1])).long()
        px2 = px.repeat_interleave(2, 0)
        score = torch.nn.Linear(model.config.text.hidden_size, 1, bias=False)
        tt = torch.cat([torch.zeros(ids.shape[0], lp, dtype=torch.long),
                        torch.ones(ids.shape[0], ids.shape[1] - lp, dtype=torch.long)], 1)
        params_trained = [p for p in hf.parameters() if p.requires_grad] + list(score.parameters())

        def loss():
            h = hf.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px2,
                         token_type_ids=tt).last_hidden_state
            r = score(h[:, -1]).view(-1, 2)
            return -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()

    opt = torch.optim.AdamW(params_trained, lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    return step


def best(step, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="sft,reward,dpo")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}")
    print("| case | jaxpref step ms | transformers step ms | jaxpref speed-up |")
    print("|---|---|---|---|")
    for name in args.cases.split(","):
        kind, rows, lp, lc = CASES[name]
        ours, model, params, batch = jaxpref_step(kind, rows, lp, lc)
        theirs = hf_step(kind, model, params, batch, lp)
        ours(), theirs()  # warm-up (and jaxpref's first call after compile)
        a, b = [], []
        for _ in range(args.iters):  # interleaved, so drift hits both
            a.append(best(ours, 1))
            b.append(best(theirs, 1))
        print(f"| {name} | {min(a) * 1e3:.0f} | {min(b) * 1e3:.0f} | {min(b) / min(a):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
