"""Plot a run's metrics.jsonl to a PNG.

    python scripts/plot_run.py runs/shapes-ppo --ppo --out docs/img/ppo_shapes.png
    python scripts/plot_run.py runs/shapes-dpo --keys loss,rewards/accuracies,eval_rewards/margins --out dpo.png
"""

import argparse

from jaxpref.plots import plot_ppo, plot_run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--ppo", action="store_true", help="the PPO panels (judge, reward, KL, win-rate)")
    p.add_argument("--keys", default="loss", help="comma-separated metric keys (default: loss)")
    a = p.parse_args()
    print(plot_ppo(a.run_dir, a.out) if a.ppo else plot_run(a.run_dir, a.keys.split(","), a.out))
