"""R^3M (alignment/algos.py): its gradient, and what the paper claims at small scale.

Synthetic check in the paper's robotics setting: a known linear reward labels random pairs, then the
"irrational" corruption flips, in every minibatch of 64, the floor(64^(1/2)) = 8 most confidently
ordered pairs (12.5%). A reward model trained with R^3M should beat plain Bradley-Terry on held-out
pairs and flag mostly the flipped pairs; without corruption it should be no worse.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignment.algos import PREFERENCE_LOSSES, r3m_delta, r3m_threshold


@pytest.mark.parametrize("lam", [0.3, 0.75, 0.9])
def test_r3m_gradient_is_bt_with_weights_clipped_at_lambda(lam):
    margins = torch.linspace(-6, 6, 41, dtype=torch.float64, requires_grad=True)
    loss, delta = PREFERENCE_LOSSES.get("r3m")(margins, lam=lam)
    (grad,) = torch.autograd.grad(loss, margins)
    weight = torch.minimum(torch.sigmoid(-margins.detach()), torch.tensor(lam, dtype=torch.float64))
    assert torch.allclose(grad, -weight / len(margins), atol=1e-12)
    # The outlier variable: positive exactly below tau = log(1/lam - 1), and sparse above it.
    tau = math.log(1 / lam - 1)
    assert torch.equal(delta > 0, margins.detach() < tau)
    assert torch.allclose(delta, (tau - margins.detach()).clamp_min(0))
    # Away from the flagged region R^3M is BT exactly.
    bt_loss, _ = PREFERENCE_LOSSES.get("bt")(margins)
    (bt_grad,) = torch.autograd.grad(bt_loss, margins)
    keep = margins.detach() >= tau
    assert torch.allclose(grad[keep], bt_grad[keep])
    assert not torch.allclose(grad[~keep], bt_grad[~keep])


def test_r3m_dpo_form_adds_delta_after_the_beta_scaling():
    """R^3M-DPO: m = beta * (policy log-ratio difference); the chain rule carries the clipped weight."""
    torch.manual_seed(0)
    beta, lam = 0.1, 0.75
    logratio_w = torch.randn(32, dtype=torch.float64, requires_grad=True)
    logratio_l = torch.randn(32, dtype=torch.float64) * 30  # some pairs confidently "wrong"
    margins = beta * (logratio_w - logratio_l)
    loss, delta = PREFERENCE_LOSSES.get("r3m")(margins, lam=lam)
    (grad,) = torch.autograd.grad(loss, logratio_w)
    weight = torch.minimum(torch.sigmoid(-margins.detach()), torch.tensor(lam, dtype=torch.float64))
    assert torch.allclose(grad, -beta * weight / 32, atol=1e-12)
    assert (delta > 0).any() and torch.equal(delta > 0, margins.detach() < r3m_threshold(lam))
    # The loss is the per-pair objective at the optimal delta: -log sigmoid(m + delta) + lam * delta.
    value = (-F.logsigmoid(margins + delta) + lam * delta).mean()
    assert torch.allclose(loss, value)


def test_lambda_must_lie_in_the_open_unit_interval():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="lambda must lie in"):
            r3m_delta(torch.zeros(2), bad)


# ---- the synthetic faithful check -------------------------------------------------------------

DIM, TRAIN, TEST, BATCH, LAM = 48, 2048, 2000, 64, 0.6


def _pairs(w, count, generator):
    a, b = torch.randn(count, DIM, generator=generator), torch.randn(count, DIM, generator=generator)
    gap = (a - b) @ w
    chosen = torch.where(gap[:, None] > 0, a, b)
    rejected = torch.where(gap[:, None] > 0, b, a)
    return chosen, rejected, gap.abs()


def _irrational(chosen, rejected, gap):
    """Flip the floor(|B|^(1/2)) pairs with the largest true reward gap in every minibatch."""
    flipped = torch.zeros(len(gap), dtype=torch.bool)
    for start in range(0, len(gap), BATCH):
        flipped[start + gap[start:start + BATCH].topk(int(BATCH ** 0.5)).indices] = True
    return (torch.where(flipped[:, None], rejected, chosen), torch.where(flipped[:, None], chosen, rejected),
            flipped)


def _fit(loss_name, chosen, rejected, seed, epochs=20):
    """A linear reward model, Adam, minibatches of the corruption's partition in shuffled order."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(DIM, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    params = {"lam": LAM} if loss_name == "r3m" else {}
    for _ in range(epochs):
        for b in torch.randperm(len(chosen) // BATCH).tolist():
            sl = slice(b * BATCH, (b + 1) * BATCH)
            loss, _ = PREFERENCE_LOSSES.get(loss_name)((model(chosen[sl]) - model(rejected[sl])).squeeze(-1), **params)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def _accuracy(model, chosen, rejected) -> float:
    return float(((model(chosen) - model(rejected)).squeeze(-1) > 0).float().mean())


@pytest.mark.slow
def test_r3m_beats_bradley_terry_under_irrational_corruption_and_flags_the_flipped_pairs():
    results = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(DIM, generator=g)
        clean_c, clean_r, gap = _pairs(w, TRAIN, g)
        test_c, test_r, _ = _pairs(w, TEST, g)
        chosen, rejected, flipped = _irrational(clean_c, clean_r, gap)
        assert abs(float(flipped.float().mean()) - 0.125) < 1e-3

        bt = _fit("bt", chosen, rejected, seed)
        r3m = _fit("r3m", chosen, rejected, seed)
        with torch.no_grad():
            flagged = r3m_delta((r3m(chosen) - r3m(rejected)).squeeze(-1), LAM) > 0
        precision = float((flagged & flipped).sum() / flagged.sum().clamp(min=1))
        recall = float((flagged & flipped).sum() / flipped.sum())
        clean_bt, clean_r3m = _fit("bt", clean_c, clean_r, seed), _fit("r3m", clean_c, clean_r, seed)
        results.append({
            "bt": _accuracy(bt, test_c, test_r), "r3m": _accuracy(r3m, test_c, test_r),
            "precision": precision, "recall": recall,
            "clean_bt": _accuracy(clean_bt, test_c, test_r), "clean_r3m": _accuracy(clean_r3m, test_c, test_r),
        })
    mean = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
    # Measured: BT 0.87, R^3M 0.92 held-out accuracy; flags 95% precise, 100% recall.
    assert mean["r3m"] - mean["bt"] >= 0.03, results
    assert all(r["r3m"] > r["bt"] for r in results), results
    assert mean["precision"] >= 0.85 and mean["recall"] >= 0.95, results
    # Without corruption R^3M is no worse than BT (it flags almost nothing there).
    assert mean["clean_r3m"] >= mean["clean_bt"] - 0.005, results


# ---- the faithful check on real text ----------------------------------------------------------

@pytest.mark.slow
def test_r3m_reward_model_flags_flipped_hhh_labels(tmp_path):
    """MiniLM reward model (LoRA, head trained in full) on the 221 HHH pairs with 20% of the labels
    flipped: R^3M's outlier variable lands on the flipped pairs far more often than on clean ones."""
    import json
    import random

    from tests.support import REPO

    from tests.support.recipes import run_align

    rows = json.loads((REPO / "data/hhh/hhh_pairs.json").read_text())
    flipped = set(random.Random(0).sample(range(len(rows)), len(rows) // 5))
    for i in flipped:
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    proc = run_align("train", str(REPO / "configs/rm_hhh.yaml"), f"output_dir={tmp_path / 'run'}",
                     f"data.path={tmp_path / 'pairs.json'}", "data.eval_fraction=0", "rm.lam=0.6",
                     "rm.max_length=128", "train.epochs=5", "train.lr=5e-4", "train.warmup_steps=5",
                     "peft.type=lora", "peft.r=4", "peft.alpha=8",
                     # bf16 on CPUs with bf16 units (104 s alone on AVX-512 AMD); fp32 elsewhere (train.bf16:
                     # auto), 565 s with AVX2 kernels while another suite ran beside it
                     timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outliers = [json.loads(line) for line in (tmp_path / "run" / "outliers.jsonl").read_text().splitlines()]
    assert [o["index"] for o in outliers] == list(range(len(rows)))
    on_flipped = sum(o["flagged"] for o in outliers if o["index"] in flipped) / len(flipped)
    on_clean = sum(o["flagged"] for o in outliers if o["index"] not in flipped) / (len(rows) - len(flipped))
    # Measured: 25% of the flipped pairs flagged (11 of 44) against 6.8% of the clean ones (12 of 177).
    assert on_flipped >= 2.5 * on_clean and on_flipped >= 0.15, (on_flipped, on_clean)
    # The flags alone do not show R^3M at work (a BT model trained on the same labels also ends up
    # disagreeing with flipped ones): its loss set the outlier variable on a sparse set of pairs.
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_epoch = [r["r3m/outlier_frac"] for r in steps if "r3m/outlier_frac" in r][-14:]
    assert 0 < sum(last_epoch) / len(last_epoch) <= 0.25, last_epoch  # measured 0.054: sparse, as in the paper


# ---- R^3M-DPO under corrupted labels, through the DPO trainer ---------------------------------

def _word_pairs(task, count: int, seed: int, flip_every: int = 0) -> tuple[list[dict], set[int]]:
    """Preference pairs of single words (the better word by the task's hidden values); with
    `flip_every`, the most confidently ordered pair of every block of that many is flipped (the
    paper's "irrational" corruption)."""
    import random

    rng = random.Random(seed)
    words = task.in_words + task.out_words
    ordered = []
    while len(ordered) < count:
        a, b = rng.sample(words, 2)
        if task.values[a] != task.values[b]:
            ordered.append((a, b) if task.values[a] > task.values[b] else (b, a))
    flipped = {max(range(start, min(start + flip_every, count)),
                   key=lambda i: task.values[ordered[i][0]] - task.values[ordered[i][1]])
               for start in range(0, count, flip_every)} if flip_every else set()
    rows = [{"prompt": "Which word is better?", "chosen": lo if i in flipped else hi,
             "rejected": hi if i in flipped else lo} for i, (hi, lo) in enumerate(ordered)]
    return rows, flipped


def dpo_on_corrupted_words(folder: Path, model: Path, loss: str, seed: int) -> dict:
    """DPO or R^3M-DPO (our trainer, in process) from a tiny Llama on 512 word pairs with 1 in 8
    flipped; held-out accuracy of the implicit reward on 200 clean pairs, and R^3M's flags."""
    import json

    import yaml

    from align.cli import build_config
    from tests.support.preference_task import WordValueTask

    task = WordValueTask(seed=seed)
    rows, flipped = _word_pairs(task, 512, seed + 1, flip_every=8)
    held, _ = _word_pairs(task, 200, seed + 2)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("train", rows), ("held", held)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    recipe = {"trainer": "dpo", "output_dir": str(folder / "run"), "seed": seed, "model": {"path": str(model)},
              "data": {"path": str(folder / "train.jsonl"), "eval_path": str(folder / "held.jsonl"),
                       "eval_size": 200, "chat_template": False},
              "train": {"max_steps": 100, "batch_size": 16, "lr": 3e-3, "bf16": False, "log_every": 100},
              "dpo": {"loss": loss, "beta": 0.5, "lam": 0.5}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trainer_cls, cfg = build_config(str(folder / "recipe.yaml"), [])
    result = {"accuracy": trainer_cls(cfg).train()["eval/accuracy"]}
    if loss == "r3m":
        flags = {o["index"] for o in map(json.loads, (folder / "run" / "outliers.jsonl").read_text().splitlines())
                 if o["flagged"]}
        result["precision"] = len(flags & flipped) / max(len(flags), 1)
        result["recall"] = len(flags & flipped) / len(flipped)
    return result


@pytest.mark.slow
def test_r3m_dpo_beats_dpo_on_corrupted_preferences(tmp_path):
    from tests.support.tiny_models import tiny_llama

    model = tiny_llama(tmp_path / "tiny")
    runs = [(dpo_on_corrupted_words(tmp_path / f"dpo{seed}", model, "sigmoid", seed),
             dpo_on_corrupted_words(tmp_path / f"r3m{seed}", model, "r3m", seed)) for seed in (0, 1)]
    gain = sum(r3m["accuracy"] - dpo["accuracy"] for dpo, r3m in runs) / len(runs)
    # Measured for seeds 0, 1, 2, 3 (default kernels; with avx2 the test passes too): held-out accuracy
    # DPO 0.725 0.680 0.750 0.740, R^3M-DPO 0.790 0.735 0.775 0.765 (gains 0.065 0.055 0.025 0.025);
    # R^3M's flags: precision 0.44 0.44 0.41 0.41 (1 pair in 8 is flipped), recall 0.77 0.78 0.66 0.72.
    # R^3M-DPO gets there sooner: trained twice as long (200 steps), DPO catches up (0.78).
    assert gain > 0.025, runs  # two-seed average 0.060
    for _, r3m in runs:
        assert r3m["precision"] > 0.3 and r3m["recall"] > 0.5, r3m
