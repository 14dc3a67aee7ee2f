"""Uncertainty-routed judges: the SNGP preference model, the router, routed RL and /v1/compare.

The faithful check trains a preference model (our trainer, a tiny Llama whose top layer is trained) on
an in-distribution slice of a task with a known truth (tests/support/preference_task.py) and shows what the
paper claims at small scale: accuracy falls as the SNGP uncertainty rises, and with a judge that is
right 90 % of the time, routing the most uncertain pairs beats routing the same number of random
pairs at several budgets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from align.cli import build_config
from alignment.config import BaseConfig, JudgeConfig, RouterConfig, load_config
from alignment.algos import REWARD_ADVANTAGES, mean_preference
from rewards.judges import OpenAIJudge
from rewards.preference_model import PreferenceScorer
from rewards.routing import JUDGED_SCORE, PairRouter, route
from rewards.server import create_app
from tests.support import REPO
from tests.support.tiny_models import tiny_llama
from tests.support.judge_server import start_judge_server
from tests.support.preference_task import WordValueTask, accuracy_by_decile, routed_accuracy, simulated_judge


# The faithful check's recipe: only the top transformer layer and the head are trained, so inputs the
# model never saw keep features of their own (full fine-tuning of a tiny model from scratch maps them
# onto the training data: measured, see the module docstring of trainers/preference_model.py).
PM_RECIPE = {"train": {"max_steps": 300, "lr": 1e-3, "batch_size": 32, "bf16": False, "log_every": 100},
             "pm": {"random_features": 1024, "trainable_layers": 1}}


def train_pm(folder: Path, model: Path, task: WordValueTask, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"trainer": "preference_model", "output_dir": str(folder / "pm"), "model": {"path": str(model)},
              "data": {"path": str(task.write_training_pairs(folder / "pairs.jsonl", 2000, seed=1))}}
    for key, value in {**PM_RECIPE, **sections}.items():
        recipe[key] = {**PM_RECIPE.get(key, {}), **value} if isinstance(value, dict) else value
    (folder / "pm.yaml").write_text(yaml.safe_dump(recipe))
    trainer_cls, cfg = build_config(str(folder / "pm.yaml"), [])
    trainer_cls(cfg).train()
    return folder / "pm" / "final"


@pytest.fixture(scope="module")
def word_pm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("word-pm")
    task = WordValueTask(seed=0)
    return train_pm(folder, tiny_llama(folder / "tiny"), task), task


@pytest.fixture(scope="module")
def scorer(word_pm):
    return PreferenceScorer.from_dir(word_pm[0], batch_size=128)


def score_items(scorer, items):
    return scorer.compare([p.prompt for p in items], [p.a for p in items], [p.b for p in items])


# ---- the faithful check ------------------------------------------------------------------------
def test_accuracy_falls_with_uncertainty_and_routing_beats_random(word_pm, scorer):
    _, task = word_pm
    items = task.pairs(300, True, seed=2) + task.pairs(200, False, seed=3)
    truth = torch.tensor([p.a_better for p in items])
    scores, uncertainty = score_items(scorer, items)
    correct = ((scores > 0) == truth).float()
    assert correct[:300].mean() > 0.8  # learned in distribution
    assert abs(float(correct[300:].mean()) - 0.5) < 0.12  # out of distribution: no better than a coin
    assert uncertainty[300:].mean() > uncertainty[:300].mean()

    deciles = [acc for _, acc in accuracy_by_decile(scores, uncertainty, truth)]
    rank = torch.arange(10.0)
    acc_rank = torch.tensor(deciles).argsort().argsort().float()
    spearman = float(torch.corrcoef(torch.stack([rank, acc_rank]))[0, 1])
    assert spearman < -0.6, deciles
    assert sum(deciles[:3]) / 3 > sum(deciles[-3:]) / 3 + 0.25, deciles

    verdicts = simulated_judge(items, accuracy=0.9, seed=5)
    for budget in (0.1, 0.2, 0.3, 0.4):
        by_uncertainty, frac = routed_accuracy(scores, uncertainty, truth, verdicts,
                                               RouterConfig("budget", budget=budget))
        random_runs = [routed_accuracy(scores, uncertainty, truth, verdicts, RouterConfig("random", budget=budget),
                                       seed=s)[0] for s in range(20)]
        assert frac == pytest.approx(budget)
        assert by_uncertainty > sum(random_runs) / len(random_runs) + 0.01, (budget, by_uncertainty, random_runs)
        # the threshold rule at the budget's uncertainty quantile routes the same pairs
        cut = float(uncertainty.sort(descending=True).values[round(budget * len(items))])
        by_threshold, _ = routed_accuracy(scores, uncertainty, truth, verdicts,
                                          RouterConfig("threshold", threshold=cut))
        assert by_threshold == pytest.approx(by_uncertainty, abs=0.01)


def test_scores_antisymmetric_and_uncertainty_symmetric(word_pm, scorer):
    _, task = word_pm
    items = task.pairs(16, True, seed=4) + task.pairs(16, False, seed=5)
    s_ab, u_ab = score_items(scorer, items)
    s_ba, u_ba = scorer.compare([p.prompt for p in items], [p.b for p in items], [p.a for p in items])
    torch.testing.assert_close(s_ab, -s_ba)
    torch.testing.assert_close(u_ab, u_ba)
    assert (u_ab >= 1).all()


def test_final_folder_reloads_the_same_model(word_pm, scorer):
    """final/ holds the fitted precision: a fresh load predicts what the trained model predicts."""
    path, task = word_pm
    calibration = json.loads((path / "calibration.json").read_text())
    assert len(calibration["deciles"]) == 10
    items = task.pairs(8, False, seed=6)
    again = PreferenceScorer.from_dir(path)
    for first, second in zip(score_items(scorer, items), score_items(again, items)):
        torch.testing.assert_close(first, second)
    assert scorer.model.precision.abs().sum() > 0


@pytest.mark.parametrize("variant", ["mc_dropout", "ensemble"])
def test_uncertainty_variants(tmp_path, tiny_model, variant):
    task = WordValueTask(seed=0)
    path = train_pm(tmp_path, tiny_model, task, train={"max_steps": 20},
                    pm={"uncertainty": variant, "random_features": 256, "spectral_norm": False})
    items = task.pairs(16, True, seed=2)
    scores, uncertainty = score_items(PreferenceScorer.from_dir(path), items)
    assert (uncertainty > 1).all() and torch.isfinite(scores).all()
    assert json.loads((path / "preference_model.json").read_text())["uncertainty"] == variant


def test_preference_model_resumes_exactly(tmp_path, tiny_model):
    """Killed after its step-2 checkpoint and resumed, a run ends where an uninterrupted one does (the
    head is checkpointed beside the backbone)."""
    task = WordValueTask(seed=0)
    sections = {"pm": {"random_features": 128}, "train": {"max_steps": 4, "save_every": 2}}
    whole = train_pm(tmp_path / "whole", tiny_model, task, **sections)
    train_pm(tmp_path / "cut", tiny_model, task, **{**sections, "train": {"max_steps": 2, "save_every": 2}})
    resumed = train_pm(tmp_path / "cut", tiny_model, task, resume=True, **sections)
    items = task.pairs(8, True, seed=2) + task.pairs(8, False, seed=3)
    for first, second in zip(score_items(PreferenceScorer.from_dir(whole), items),
                             score_items(PreferenceScorer.from_dir(resumed), items)):
        torch.testing.assert_close(first, second)


# ---- router units (a stand-in scorer and judge isolate the combination rules) --------------------
class FixedScorer:
    """S_ab = value(a) - value(b) with a fixed uncertainty per pair, like a trained preference model."""

    def __init__(self, values: dict[str, float], uncertainty: float = 1.5):
        self.values, self.uncertainty = values, uncertainty

    def compare(self, prompts, responses_a, responses_b):
        scores = torch.tensor([self.values[a] - self.values[b] for a, b in zip(responses_a, responses_b)])
        return scores, torch.full_like(scores, self.uncertainty)


class ListJudge:
    def __init__(self, verdict):
        self.verdict, self.calls = verdict, 0

    def compare(self, prompts, responses_a, responses_b):
        self.calls += len(prompts)
        return [self.verdict(a, b) for a, b in zip(responses_a, responses_b)]

    def close(self):
        pass


def test_route_policies():
    u = torch.tensor([1.0, 1.6, 1.2, 2.0, 1.45, 1.1, 1.3, 1.5, 1.05, 1.7])
    assert route(u, RouterConfig("threshold", threshold=1.4)).nonzero().flatten().tolist() == [1, 3, 4, 7, 9]
    assert route(u, RouterConfig("budget", budget=0.3)).nonzero().flatten().tolist() == [1, 3, 9]
    picked = route(u, RouterConfig("random", budget=0.3), torch.Generator().manual_seed(0))
    assert picked.sum() == 3
    assert route(u, RouterConfig("always")).all() and not route(u, RouterConfig("never")).any()


def test_judge_override_is_antisymmetric_and_failures_keep_the_model_score():
    values = {"a": 0.3, "b": -0.2, "c": 0.1}
    # the judge prefers the alphabetically later response, except that any pair with "c" fails
    judge = ListJudge(lambda x, y: None if "c" in (x, y) else (1.0 if x > y else -1.0))
    router = PairRouter(FixedScorer(values), judge, RouterConfig("always"))
    (s,), stats = router.group_scores(["p"], [["a", "b", "c"]])
    assert s[0, 1] == -JUDGED_SCORE and s[1, 0] == JUDGED_SCORE  # judged: b beats a
    assert s[0, 2] == pytest.approx(0.2) and s[2, 0] == pytest.approx(-0.2)  # failed: the model's score
    torch.testing.assert_close(s, -s.T)
    assert stats["router/judge_frac"] == 1.0 and stats["router/judge_failures"] == 2.0
    assert judge.calls == 3 and router.failures == 2


def test_pairwise_advantage_is_rloo_for_reward_differences():
    rewards = torch.randn(5, 6, dtype=torch.float64)
    differences = rewards[:, :, None] - rewards[:, None, :]
    torch.testing.assert_close(mean_preference(differences), REWARD_ADVANTAGES.get("rloo")(rewards))
    router = PairRouter(FixedScorer({str(i): float(r) for i, r in enumerate(rewards[0])}), None, RouterConfig("never"))
    (s,), _ = router.group_scores(["p"], [[str(i) for i in range(6)]])
    torch.testing.assert_close(mean_preference(s.double()), REWARD_ADVANTAGES.get("rloo")(rewards[0]))


def test_verifier_failures_lose_to_passing_responses():
    router = PairRouter(FixedScorer({"a": 1.0, "b": 0.0, "c": 5.0, "d": 4.0}), None, RouterConfig("never"))
    (s,), _ = router.group_scores(["p"], [["a", "b", "c", "d"]], passed=[[True, True, False, False]])
    assert s[0, 1] == pytest.approx(1.0)  # two passing responses: the model's score
    assert s[0, 2] == JUDGED_SCORE and s[3, 1] == -JUDGED_SCORE  # failing ones lose, whatever the model says
    assert s[2, 3] == 0.0
    (s,), _ = router.group_scores(["p"], [["a", "b"]], passed=[[False, False]])
    assert (s == 0).all()


@pytest.mark.parametrize("mode", ["slow", "error500", "garbage"])
def test_failing_http_judge_never_changes_a_score(mode):
    """A real OpenAI-compatible server that times out, fails or talks nonsense: every pair keeps the
    preference model's score, and every failure is counted."""
    values = {"1": 0.5, "2": -0.5, "3": 0.0}
    with start_judge_server(mode=mode, slow_s=2.0)[1] as server:
        judge = OpenAIJudge(JudgeConfig(base_url=server.base_url, model="rule-judge", timeout_s=0.3, retries=1),
                            backoff_s=0.01)
        router = PairRouter(FixedScorer(values), judge, RouterConfig("always"))
        routed = router.compare(["p"] * 3, ["1", "1", "2"], ["2", "3", "3"])
        judge.close()
    torch.testing.assert_close(routed.scores, torch.tensor([1.0, 0.5, -0.5]))
    assert not routed.judged.any() and routed.stats["router/judge_failures"] == 3.0


def test_http_judge_verdicts_replace_uncertain_pairs():
    values = {"4": -1.0, "9": 1.0, "2": 0.0}
    with start_judge_server()[1] as server:
        judge = OpenAIJudge(JudgeConfig(base_url=server.base_url, model="rule-judge", timeout_s=5.0))
        router = PairRouter(FixedScorer(values), judge, RouterConfig("budget", budget=0.5))
        # uncertain pairs: the first two (the scorer gives every pair 1.5: top-k keeps the first)
        routed = router.compare(["p"] * 2, ["4", "9"], ["9", "2"])
        judge.close()
    assert routed.judged.tolist() == [True, False]
    assert routed.scores.tolist() == [-JUDGED_SCORE, 1.0]  # the judge: 9 beats 4; the model's 9 - 2


# ---- /v1/compare on a preference model ------------------------------------------------------------
def test_compare_endpoint_routes_to_the_judge(word_pm, scorer):
    _, task = word_pm
    items = task.pairs(6, False, seed=7)
    body = {"prompts": [p.prompt for p in items], "responses_a": [p.a for p in items],
            "responses_b": [p.b for p in items]}
    with start_judge_server()[1] as server:
        judge = OpenAIJudge(JudgeConfig(base_url=server.base_url, model="rule-judge", timeout_s=5.0))
        router = PairRouter(scorer, judge, RouterConfig("budget", budget=0.5))
        with TestClient(create_app(None, router=router)) as client:
            reply = client.post("/v1/compare", json=body).json()
            assert client.post("/v1/score", json={"prompts": ["p"], "responses": ["r"]}).status_code == 400
    scores, uncertainty = score_items(scorer, items)
    assert reply["uncertainty"] == pytest.approx(uncertainty.tolist(), abs=1e-5)
    assert sum(reply["judged"]) == 3
    top = set(uncertainty.argsort(descending=True)[:3].tolist())
    for i, (prob, judged) in enumerate(zip(reply["prob_a"], reply["judged"])):
        assert judged == (i in top)
        # the rule server sees words, no integers: a tie, prob 0.5; unjudged pairs keep the model's score
        expected = 0.5 if judged else float(torch.sigmoid(scores[i]))
        assert prob == pytest.approx(expected, abs=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_rm_with_a_routing_config(word_pm, tmp_path):
    """`align serve-rm --model PM --routing configs/judge_routing.yaml` (pointed at a loopback judge)."""
    path, task = word_pm
    with start_judge_server()[1] as server:
        routing = yaml.safe_load((REPO / "configs" / "judge_routing.yaml").read_text())
        routing["reward"]["judge"].update(base_url=server.base_url, model="rule-judge")
        routing["reward"]["router"].update(policy="always")
        (tmp_path / "routing.yaml").write_text(yaml.safe_dump(routing))
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "alignment", "serve-rm", "--model", str(path), "--port",
                                 str(port), "--routing", str(tmp_path / "routing.yaml")], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            reply = httpx.post(url + "/v1/compare", json={"prompts": ["p", "p"], "responses_a": ["7", "1"],
                                                          "responses_b": ["3", "8"]}, timeout=30).json()
        finally:
            proc.send_signal(signal.SIGINT)
            output = proc.communicate(timeout=30)[0]
    assert reply["judged"] == [True, True], output
    assert reply["prob_a"] == pytest.approx([float(torch.sigmoid(torch.tensor(2.0))),
                                             float(torch.sigmoid(torch.tensor(-2.0)))])
    assert server.requests == 2


def test_routing_config_errors():
    with pytest.raises(Exception, match="reward.judge: required"):
        load_config(BaseConfig, {"reward": {"type": "routed", "preference_model": "x"}})
    with pytest.raises(Exception, match="unknown config key 'reward.router.polcy'"):
        load_config(BaseConfig, {"reward": {"type": "routed", "preference_model": "x", "router": {"polcy": "x"}}})


# ---- routed RL end to end ------------------------------------------------------------------------
def test_routed_rl_moves_the_policy_along_the_routed_advantages(word_pm, tiny_model, tmp_path):
    """A tiny policy, the word-task preference model, an HTTP judge (the routing block is the one in
    configs/judge_routing.yaml with the judge's address and the budget changed): each step's update
    raises the log-probability of the responses with positive routed advantage and lowers the others."""
    path, _ = word_pm
    routing = yaml.safe_load((REPO / "configs" / "judge_routing.yaml").read_text())["reward"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Which words are better? Round {i}."}) + "\n" for i in range(8)))
    with start_judge_server()[1] as server:
        routing["judge"].update(base_url=server.base_url, model="rule-judge", timeout_s=10)
        routing["router"].update(policy="budget", budget=0.25)
        routing["preference_model"] = str(path)
        recipe = {"trainer": "routed_rl", "output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model)},
                  "data": {"path": str(prompts)}, "rollout": {"n": 4, "max_new_tokens": 6},
                  "train": {"max_steps": 3, "lr": 1e-3, "batch_size": 2, "bf16": False}, "reward": routing}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        trainer_cls, cfg = build_config(str(tmp_path / "recipe.yaml"), [])
        trainer = trainer_cls(cfg)
        batches = []
        rollout = trainer.rollout
        trainer.rollout = lambda step: batches.append(rollout(step)) or batches[-1]
        trainer.start()
        advantages, moved, steps = [], [], []
        for step in range(cfg.train.max_steps):
            steps.append(trainer.step(step))
            batch = batches[-1]
            advantages.append(batch.advantages)  # each sample's routed pairwise advantage
            # how far the update moved each response's log-probability
            moved.append(((trainer.policy_logprobs(batch) - batch.old_logp) * batch.mask).sum(-1))
        judge_requests = server.requests
    for row in steps:
        assert row["router/judge_frac"] == pytest.approx(3 / 12)  # 2 prompts x 6 pairs, a quarter judged
        assert row["router/judge_failures"] == 0
        assert row["sync/logprob_err"] < 1e-3
    assert judge_requests == 3 * 3
    advantages, moved = torch.cat(advantages), torch.cat(moved)
    decided = advantages != 0  # a response tied with its whole group (e.g. identical samples) gets 0
    assert decided.sum() >= len(advantages) // 2, advantages
    agree = float(((advantages[decided] > 0) == (moved[decided] > 0)).float().mean())
    correlation = float(torch.corrcoef(torch.stack([advantages, moved]))[0, 1])
    # Measured (22 of 24 responses decided): sign agreement 0.95 / 1.0, correlation 0.82 / 0.94 (default
    # kernels / avx2); an update that ignored them would agree about half the time.
    assert agree >= 0.8 and correlation > 0.5, (agree, correlation, advantages, moved)
