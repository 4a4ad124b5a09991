"""Training: the shared core (state, optimizer, loop, checkpoints, logging) and one trainer per
algorithm (sft, reward, dpo, ppo), each `run_<algo>(cfg)`; `jaxpref.train.cli` holds the commands.

    from jaxpref.config import load_config
    from jaxpref.train.reward import run_reward
    metrics = run_reward(load_config("reward", "jaxpref/tasks/shapes/configs/reward.yaml", ["max_steps=100"]))

CLI: `jaxpref sft|reward|dpo|ppo --config F [key=value ...]`.
"""
