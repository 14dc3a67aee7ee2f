"""A reward function as TRL's GRPOTrainer calls it: keywords, one value per completion.

`configs/grpo_trl_rewards.yaml` uses it beside `trl.rewards:think_format_reward`. `solution` is a
column of data/arithmetic, passed under its own name; completions are message lists because the
prompts are conversations.
"""

import re


def correct_sum(completions, solution, **kwargs):
    """1.0 when the last number of the reply (after any </think>) is the solution, else 0.0."""
    rewards = []
    for completion, answer in zip(completions, solution):
        reply = completion[0]["content"].split("</think>")[-1]
        numbers = re.findall(r"-?\d+", reply)
        rewards.append(1.0 if numbers and numbers[-1] == str(answer).strip() else 0.0)
    return rewards
