"""The pod-scale table of docs/BENCHMARKS.md: PaliGemma-3B's forward pass, DPO step and PPO iteration
and LLaVA-1.5-7B's DPO step, each compiled ahead of time (`jaxpref profile --topology`, on this CPU
host, libtpu from `pip install 'jaxpref[tpu]'`) for several TPU slices at one global batch, so the
per-chip columns show how memory falls with the slice.

    python scripts/aot_table.py --out /tmp/aot            # one JSON per cell, then the markdown table
    python scripts/aot_table.py --out /tmp/aot --table    # the table from the JSON already there
    python scripts/aot_table.py --out /tmp/aot-lora --lora   # full weights beside LoRA r=16 all-linear

Each cell is one `jaxpref profile` process (its JSON kept in --out). Global batch: 32 rows for the
forward pass (264 tokens), 32 pairs per micro-batch for DPO (the recipe's lengths, 2 micro-batches),
256 prompts per PPO rollout (the recipe's 4 mini-batches); the recipe files name everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TOPOLOGIES = {"v5e-8": 8, "v5e-16": 16, "v5e-32": 32, "v5p-16": 8, "v6e-8": 8}
PG = ["model.name_or_path=paligemma-3b-224"]


def cells():
    """(name, topology, jaxpref profile arguments)"""
    for topo, chips in TOPOLOGIES.items():
        yield ("paligemma-3b forward", topo, ["--model", "paligemma-3b-224", "--dtype", "bfloat16", "--batch", "32",
                                              "--seq", "264", "--mesh-data", "1", "--mesh-fsdp", "-1"])
        yield ("paligemma-3b dpo", topo, ["--config", "configs/paligemma-3b/dpo_rlaif_v.yaml", *PG, "mesh.data=1", "mesh.fsdp=-1",
                                          f"per_device_train_batch_size={32 // chips}",
                                          "gradient_accumulation_steps=2"])
        yield ("paligemma-3b ppo", topo, ["--config", "configs/paligemma-3b/ppo_rlaif_v.yaml", *PG,
                                          "reward_model_path=paligemma-3b-224", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
                                          f"per_device_train_batch_size={256 // (4 * chips)}"])
        yield ("llava-7b dpo", topo, ["--config", "configs/llava-1.5-7b/dpo_rlaif_v.yaml",
                                      "model.name_or_path=llava-1.5-7b", "mesh.data=1", "mesh.fsdp=-1",
                                      f"per_device_train_batch_size={32 // chips}", "gradient_accumulation_steps=2"])


LORA = ["model.use_peft=true", "model.lora_target_modules=all-linear", "model.lora_r=16", "model.lora_alpha=32"]


def lora_cells():
    """(name, topology, arguments): PaliGemma-3B's DPO step on v5e-8 and PPO iteration on v5e-16 and v5e-8,
    full weights beside LoRA r=16 on every linear layer (`--lora`), and LoRA on a bfloat16 base."""
    dpo = ["--config", "configs/paligemma-3b/dpo_rlaif_v.yaml", *PG, "mesh.data=1", "mesh.fsdp=-1",
           "per_device_train_batch_size=4", "gradient_accumulation_steps=2"]
    for topo, chips in (("v5e-16", 16), ("v5e-8", 8)):
        ppo = ["--config", "configs/paligemma-3b/ppo_rlaif_v.yaml", *PG, "reward_model_path=paligemma-3b-224",
               "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", f"per_device_train_batch_size={256 // (4 * chips)}"]
        if topo == "v5e-8":
            yield "paligemma-3b dpo", topo, dpo
            yield "paligemma-3b dpo lora", topo, dpo + LORA
        yield "paligemma-3b ppo", topo, ppo
        yield "paligemma-3b ppo lora", topo, ppo + LORA
        if topo == "v5e-8":  # the base held in bfloat16 too (model.dtype): the adapters stay float32
            yield "paligemma-3b ppo lora, bf16 base", topo, ppo + LORA + ["model.dtype=bfloat16"]


def slug(name: str, topo: str) -> str:
    return f"{name.replace(', ', '_').replace(' ', '_')}@{topo}"


def run(out: str, only: str | None, lora: bool = False):
    os.makedirs(out, exist_ok=True)
    for name, topo, argv in (lora_cells() if lora else cells()):
        path = os.path.join(out, slug(name, topo) + ".json")
        if (only and only not in name) or os.path.exists(path):
            continue
        cmd = [sys.executable, "-m", "jaxpref.cli", "profile", *argv, "output_dir=/tmp/aot-unused",
               "data.dataset_name=unused", "--topology", topo, "--no-levers", "--json", path]
        if "--model" in argv:
            cmd.remove("output_dir=/tmp/aot-unused")
            cmd.remove("data.dataset_name=unused")
        print(" ".join(cmd[2:]), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:], flush=True)
            with open(path + ".err", "w") as f:
                f.write(r.stderr)
        else:
            print(r.stdout, flush=True)


def reports(out: str, cell_list):
    """(name, topology, JSON report) of each cell whose report is in `out`."""
    for name, topo, _ in cell_list:
        path = os.path.join(out, slug(name, topo) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                yield name, topo, json.load(f)


def table(out: str) -> str:
    rows = ["| step | slice | chips | per-chip GiB (temporaries) | HBM GiB | fits | TFLOP / step | est. step at 40 % MFU "
            "| compile s |", "|---|---|---|---|---|---|---|---|---|"]
    g = 2**30
    for name, topo, r in reports(out, cells()):
        rows.append(f"| {name} | {topo} | {r['chips']} | {r['per_device_memory_bytes'] / g:.2f} "
                    f"({r['memory_bytes'].get('temp', 0) / g:.2f}) | {r['device_memory_bytes'] / g:.1f} | "
                    f"{'yes' if r['fits'] else '**no**'} | {r['flops_per_step'] / 1e12:.1f} | "
                    f"{r['estimated_step_seconds']:.2f} s | {r['compile_seconds']:.0f} |")
    return "\n".join(rows)


def lora_table(out: str) -> str:
    rows = ["| step | slice | train state GiB / chip | arguments GiB | temporaries GiB | per-chip GiB | HBM GiB | fits "
            "| compile s |", "|---|---|---|---|---|---|---|---|---|"]
    g = 2**30
    for name, topo, r in reports(out, lora_cells()):
        m = r["memory_bytes"]
        rows.append(f"| {name} | {topo} | {r['train_state_bytes'] / g:.2f} | {m.get('argument', 0) / g:.2f} | "
                    f"{m.get('temp', 0) / g:.2f} | {r['per_device_memory_bytes'] / g:.2f} | "
                    f"{r['device_memory_bytes'] / g:.1f} | {'yes' if r['fits'] else '**no**'} | "
                    f"{r['compile_seconds']:.0f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for one JSON report per cell")
    p.add_argument("--only", default=None, help="cells whose name contains this")
    p.add_argument("--table", action="store_true", help="only print the table from --out")
    p.add_argument("--lora", action="store_true", help="the LoRA table: full weights beside LoRA r=16 all-linear")
    args = p.parse_args()
    if not args.table:
        run(args.out, args.only, args.lora)
    print(lora_table(args.out) if args.lora else table(args.out))


if __name__ == "__main__":
    main()
