"""PMD-mean (trainers/pmd.py; the math in alignment/algos.py): the loss, the leave-one-out baselines,
and the population solution (Xu, Lu, Yu, Zhao, arXiv 2602.05933). Everything here runs in float64 on CPU, with tight tolerances, so
that a wrong sign, a missing length normalisation or a wrong baseline fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignment.algos import POLICY_LOSSES, REWARD_ADVANTAGES, leave_one_out_mean, leave_one_out_partition, pmd_loss

DT = torch.float64


# ---------------------------------------------------------------------------------------------------
# Helpers: Lambert W (scipy is not installed), the PMD-mean population closed form, KL mirror descent.
# ---------------------------------------------------------------------------------------------------

def lambertw_exp(s: float) -> float:
    """Principal-branch W(e^s) for real s: the w > 0 with w * e^w = e^s, i.e. w + log w = s.

    Taking the log of the argument keeps it finite when c * e^{A/tau} is huge (small tau).
    """
    if s < 1.0:  # Halley on w e^w = x, x <= e
        x = math.exp(s)
        w = math.log1p(x)
        for _ in range(100):
            ew = math.exp(w)
            f = w * ew - x
            step = f / (ew * (w + 1) - (w + 2) * f / (2 * w + 2))
            w -= step
            if abs(step) <= 1e-16 * (1 + abs(w)):
                break
        return w
    w = s - math.log(s)  # >= 1 for s >= 1; Newton on w + log w - s, which is concave and increasing
    for _ in range(100):
        step = (w + math.log(w) - s) / (1 + 1 / w)
        w -= step
        if abs(step) <= 1e-16 * (1 + w):
            break
    return w


def pmd_mean_population(pi_t: list[float], r: list[float], tau: float, scale: float = 1.0) -> list[float]:
    """Minimiser over distributions pi of E_{pi_t}[(log pi/pi_t - A/tau)^2], A = scale * (r - E_{pi_t} r).

    Stationarity with a multiplier for sum(pi) = 1 gives log(pi/pi_t) = A/tau - W(c e^{A/tau}), with
    c = KL(pi_t || pi) >= 0 (so the principal branch). Since W(z) e^{W(z)} = z this is
    pi(y) = pi_t(y) W(c e^{A(y)/tau}) / c, which is decreasing in c: solve sum(pi) = 1 by bisection on log c.
    """
    mean = sum(p * x for p, x in zip(pi_t, r))
    a = [scale * (x - mean) / tau for x in r]

    def new(log_c: float) -> list[float]:
        return [p * lambertw_exp(log_c + ai) * math.exp(-log_c) for p, ai in zip(pi_t, a)]

    lo, hi = -1.0, 1.0
    while sum(new(lo)) <= 1:
        lo *= 2
    while sum(new(hi)) >= 1:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(new(mid)) > 1 else (lo, mid)
    return new(0.5 * (lo + hi))


def kl_pmd(pi_t: list[float], r: list[float], tau: float) -> list[float]:
    """Exact KL mirror-descent step pi_t e^{r/tau} / Z (max-shifted)."""
    m = max(r)
    z = [p * math.exp((x - m) / tau) for p, x in zip(pi_t, r)]
    return [v / sum(z) for v in z]


# ---------------------------------------------------------------------------------------------------
# 1. Gradient at Delta = 0 is length-normalised leave-one-out REINFORCE.
# ---------------------------------------------------------------------------------------------------

class TinyPolicy:
    """logits(t) = W[t] + U[previous token] (BOS row for t = 0): small, but context dependent.

    The analytic gradient of a sequence's summed log-prob is easy: d log softmax(z)_y / dz = e_y - softmax(z).
    """

    def __init__(self, vocab: int, max_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.W = torch.randn(max_len, vocab, generator=g, dtype=DT).requires_grad_()
        self.U = torch.randn(vocab + 1, vocab, generator=g, dtype=DT).requires_grad_()  # row `vocab` = BOS

    def prev(self, tokens):
        bos = torch.full_like(tokens[:, :1], self.vocab)
        return torch.cat([bos, tokens[:, :-1]], 1)

    def logits(self, tokens):
        return self.W.unsqueeze(0) + self.U[self.prev(tokens)]

    def logp(self, tokens):
        return torch.log_softmax(self.logits(tokens), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def grad_delta(self, tokens, mask):
        """Per sequence, d/d(W, U) of sum_t mask_t log pi(y_t | prev): shapes (B, *W.shape), (B, *U.shape)."""
        with torch.no_grad():
            score = (torch.nn.functional.one_hot(tokens, self.vocab).to(DT)
                     - torch.softmax(self.logits(tokens), -1)) * mask.unsqueeze(-1)  # (B, R, V)
            gW = score  # logits(t) depends on W[t] alone
            gU = torch.zeros(tokens.shape[0], *self.U.shape, dtype=DT)
            gU.scatter_add_(1, self.prev(tokens).unsqueeze(-1).expand_as(score), score)
        return gW, gU


def _policy_batch(seed: int = 0):
    prompts, n, R, V = 3, 4, 6, 5
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (prompts * n, R), generator=g)
    lengths = torch.tensor([1, 6, 3, 4, 2, 5, 6, 1, 3, 3, 4, 2])
    mask = (torch.arange(R) < lengths.unsqueeze(1)).to(DT)
    tokens = torch.where(mask.bool(), tokens, torch.zeros_like(tokens))  # pad id 0 (a real token too)
    rewards = torch.randn(prompts, n, generator=g, dtype=DT)
    return TinyPolicy(V, R, seed), tokens, mask, rewards, lengths.to(DT)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_gradient_at_zero_log_ratio_is_loo_reinforce(tau):
    policy, tokens, mask, rewards, lengths = _policy_batch()
    adv = leave_one_out_mean(rewards).reshape(-1)
    logp = policy.logp(tokens)
    loss, _ = pmd_loss(logp, logp.detach(), adv, mask, tau=tau)
    gW, gU = torch.autograd.grad(loss, [policy.W, policy.U])

    # -(1/B) sum_i A_i grad(Delta_i) / |y_i|, with A_i = r_i - mean_{j != i} r_j built by hand, not by the code.
    loo = torch.tensor([[r[i] - (sum(r) - r[i]) / (len(r) - 1) for i in range(len(r))]
                        for r in rewards.tolist()], dtype=DT).reshape(-1)
    assert torch.allclose(adv, loo, atol=1e-14)
    dW, dU = policy.grad_delta(tokens, mask)
    coef = -(loo / lengths) / len(loo)
    expect_W = (coef.view(-1, 1, 1) * dW).sum(0)
    expect_U = (coef.view(-1, 1, 1) * dU).sum(0)
    assert expect_W.abs().max() > 1e-2 and expect_U.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(gW, expect_W, atol=1e-10, rtol=1e-6)
    torch.testing.assert_close(gU, expect_U, atol=1e-10, rtol=1e-6)


def test_gradient_off_policy_pulls_back():
    # Away from Delta = 0 the gradient is -(1/B) sum_i (A_i - tau Delta_i) grad(Delta_i) / |y_i|.
    tau = 0.3
    policy, tokens, mask, rewards, lengths = _policy_batch(seed=1)
    adv = leave_one_out_mean(rewards).reshape(-1)
    logp = policy.logp(tokens)
    old = logp.detach() + 0.2 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    delta = ((logp.detach() - old) * mask).sum(-1)
    loss, stats = pmd_loss(logp, old, adv, mask, tau=tau)
    gW, gU = torch.autograd.grad(loss, [policy.W, policy.U])
    dW, dU = policy.grad_delta(tokens, mask)
    coef = -((adv - tau * delta) / lengths) / len(adv)
    torch.testing.assert_close(gW, (coef.view(-1, 1, 1) * dW).sum(0), atol=1e-10, rtol=1e-6)
    torch.testing.assert_close(gU, (coef.view(-1, 1, 1) * dU).sum(0), atol=1e-10, rtol=1e-6)
    assert stats["pmd/log_ratio"] == pytest.approx(float(delta.mean()), abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# 2. The partition (log-mean-exp) baseline.
# ---------------------------------------------------------------------------------------------------

def _ploo_direct(rewards: list[list[float]], tau: float) -> list[list[float]]:
    """r_i - tau log((1/(G-1)) sum_{j != i} e^{r_j/tau}), one loop per element, max-shifted in float64."""
    out = []
    for row in rewards:
        adv = []
        for i, ri in enumerate(row):
            others = [x / tau for j, x in enumerate(row) if j != i]
            m = max(others)
            lme = m + math.log(math.fsum(math.exp(z - m) for z in others) / len(others))
            adv.append(ri - tau * lme)
        out.append(adv)
    return out


def _rewards():
    g = torch.Generator().manual_seed(3)
    rows = torch.rand(3, 5, generator=g, dtype=DT) * 2 - 1
    binary = torch.tensor([[1.0, -1.0, -1.0, -1.0, -1.0], [1.0, 1.0, -1.0, 1.0, 1.0]], dtype=DT)
    return torch.cat([rows, binary])


@pytest.mark.parametrize("tau", [10.0, 1.0, 0.1, 0.01, 0.001])
def test_partition_baseline_matches_direct(tau):
    r = _rewards()
    got = leave_one_out_partition(r, tau=tau)
    assert torch.isfinite(got).all()  # tau = 0.001 puts r/tau = +-1000: naive exp overflows float64
    expect = torch.tensor(_ploo_direct(r.tolist(), tau), dtype=DT)
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=1e-12)


def test_partition_baseline_float32_is_stable():
    # float32 rewards are computed in float64 internally and come back float32, finite.
    r = _rewards()
    got = leave_one_out_partition(r.float(), tau=0.001)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), torch.tensor(_ploo_direct(r.tolist(), 0.001), dtype=DT),
                               atol=1e-6, rtol=0)


def test_partition_baseline_limits():
    r = _rewards()
    # tau -> inf: log-mean-exp -> mean, so ploo -> rloo (the gap is ~ var/(2 tau) ~ 1e-4 here).
    gap = (leave_one_out_partition(r, tau=1e4) - leave_one_out_mean(r)).abs().max()
    assert gap < 1e-3
    assert gap > 0  # still a different estimator
    # tau -> 0: log-mean-exp -> max, so ploo -> r_i - max_{j != i} r_j, within tau log(G - 1).
    n = r.shape[1]
    others_max = torch.stack([torch.cat([r[:, :i], r[:, i + 1:]], 1).max(1).values for i in range(n)], 1)
    assert (leave_one_out_partition(r, tau=1e-3) - (r - others_max)).abs().max() <= 1e-3 * math.log(n - 1) + 1e-12


# ---------------------------------------------------------------------------------------------------
# 3. The population solution (Lambert W), found by minimising pmd_loss itself.
# ---------------------------------------------------------------------------------------------------

def _minimise_population(counts: list[int], rewards: list[float], tau: float, rloo: bool = False) -> list[float]:
    """pi_t = counts / N; feed pmd_loss one length-1 "response" per sample, so its batch mean is exactly the
    expectation under pi_t; optimise the logits of a categorical pi (started at pi_t) with L-BFGS."""
    outcome = torch.tensor([k for k, c in enumerate(counts) for _ in range(c)])
    pi_t = torch.tensor(counts, dtype=DT) / sum(counts)
    r = torch.tensor(rewards, dtype=DT)[outcome]
    adv = leave_one_out_mean(r.unsqueeze(0)).squeeze(0) if rloo else r - r.mean()  # population A = r - E r
    old = pi_t.log()[outcome].unsqueeze(1)
    mask = torch.ones_like(old)
    theta = pi_t.log().clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, 0)[outcome].unsqueeze(1)
        loss, _ = pmd_loss(logp, old, adv, mask, tau=tau)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    assert theta.grad.abs().max() < 1e-7  # converged
    return torch.softmax(theta.detach(), 0).tolist()


@pytest.mark.parametrize("tau", [1.0, 0.3, 0.1])
def test_population_solution_matches_lambert_w(tau):
    counts = [1, 2, 3, 5, 9]  # pi_t = (0.05, 0.1, 0.15, 0.25, 0.45)
    rewards = [1.0, 0.2, -0.3, 0.5, -1.0]
    pi_t = [c / sum(counts) for c in counts]
    closed = pmd_mean_population(pi_t, rewards, tau)
    assert sum(closed) == pytest.approx(1.0, abs=1e-12)
    found = _minimise_population(counts, rewards, tau)
    assert max(abs(a - b) for a, b in zip(found, closed)) < 1e-6  # asked for 1e-3; it is far better
    assert max(abs(a - b) for a, b in zip(closed, pi_t)) > 0.05  # and the step actually moved pi


def test_population_solution_with_loo_advantages():
    # rloo over the whole population (one group of G = N samples) is A scaled by G / (G - 1): the same
    # closed form with the scaled A. As G -> inf the factor disappears.
    counts, rewards, tau = [1, 2, 3, 5, 9], [1.0, 0.2, -0.3, 0.5, -1.0], 0.3
    n = sum(counts)
    pi_t = [c / n for c in counts]
    found = _minimise_population(counts, rewards, tau, rloo=True)
    closed = pmd_mean_population(pi_t, rewards, tau, scale=n / (n - 1))
    assert max(abs(a - b) for a, b in zip(found, closed)) < 1e-6
    assert max(abs(a - b) for a, b in zip(found, pmd_mean_population(pi_t, rewards, tau))) > 1e-3


# The paper's table: (tau, p) -> (KL-PMD p_new, PMD-mean p_new), binary reward, p = P(correct).
TABLE = [(1.0, 0.05, 0.125, 0.121), (0.5, 0.05, 0.280, 0.213), (0.1, 0.01, 0.996, 0.260),
         (0.1, 0.05, 0.999, 0.567), (0.1, 0.5, 1.0, 0.997)]


def _counts(p: float) -> list[int]:
    """pi_t = (1 - p, p) as whole sample counts, for `_minimise_population`."""
    rare = 1 if p <= 0.5 else round(p / (1 - p))
    return [round(rare * (1 - p) / p), rare]


@pytest.mark.parametrize("tau,p,kl_new,pmd_new", TABLE)
def test_methods_table_uses_zero_one_rewards(tau, p, kl_new, pmd_new):
    # pmd_loss minimised over the population reproduces the table with rewards {0 (wrong), 1 (correct)},
    # NOT with the +-1 rewards the recipe trains with. (+-1 rewards at tau equal 0/1 rewards at tau / 2:
    # e.g. +-1 at tau = 1 gives 0.213, the table's tau = 0.5 row.) So the trainer at algo.tau = t behaves
    # like the table's row for tau = t / 2.
    counts = _counts(p)
    zero_one = _minimise_population(counts, [0.0, 1.0], tau)[1]
    assert zero_one == pytest.approx(pmd_new, abs=2e-3)
    assert kl_pmd([1 - p, p], [0.0, 1.0], tau)[1] == pytest.approx(kl_new, abs=2e-3)  # the table's KL column
    if p < 0.5:  # the +-1 convention does not give the table
        assert abs(_minimise_population(counts, [-1.0, 1.0], tau)[1] - pmd_new) > 0.05
    assert _minimise_population(counts, [-1.0, 1.0], 2 * tau)[1] == pytest.approx(zero_one, abs=1e-6)


def test_methods_table_row_by_optimisation():
    # One table row straight from pmd_loss (p = 1/20 exactly): tau = 0.1, p = 0.05 -> 0.567.
    found = _minimise_population([19, 1], [0.0, 1.0], 0.1)
    assert found[1] == pytest.approx(0.567, abs=2e-3)
    assert found[1] == pytest.approx(pmd_mean_population([0.95, 0.05], [0.0, 1.0], 0.1)[1], abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# 4. More conservative than KL mirror descent when the success rate is low.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.01, 0.05])
@pytest.mark.parametrize("tau", [1.0, 0.5, 0.2, 0.1])
@pytest.mark.parametrize("rewards", [[0.0, 1.0], [-1.0, 1.0]])
def test_conservative_at_low_success_rate(p, tau, rewards):
    # The step pmd_loss takes over the population against the exact KL mirror-descent step.
    kl = kl_pmd([1 - p, p], rewards, tau)[1]
    pmd = _minimise_population(_counts(p), rewards, tau)[1]
    assert 2 * p < pmd < kl  # still an improvement (2.4x p to 38x p here), but a smaller step
    if tau <= 0.5:
        assert pmd - p < 0.85 * (kl - p)  # and markedly smaller once tau is small


def test_close_to_kl_at_high_success_rate():
    kl = kl_pmd([0.5, 0.5], [0.0, 1.0], 0.1)[1]
    pmd = _minimise_population(_counts(0.5), [0.0, 1.0], 0.1)[1]
    assert kl > 0.99 and pmd > 0.99 and abs(kl - pmd) < 5e-3


# ---------------------------------------------------------------------------------------------------
# 5. The loss value by hand, and padding.
# ---------------------------------------------------------------------------------------------------

def _hand_batch():
    # Lengths 2 and 3 in a width-4 batch; the padding entries hold junk that must not matter.
    logp = torch.tensor([[-0.5, -1.0, 9.0, 9.0], [-2.0, -0.25, -0.5, 5.0]], dtype=DT)
    old = torch.tensor([[-1.0, -1.25, -3.0, 7.0], [-1.5, -0.5, -0.5, -5.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=DT)
    adv = torch.tensor([1.0, -0.5], dtype=DT)
    return logp, old, adv, mask


def test_loss_value_by_hand():
    logp, old, adv, mask = _hand_batch()
    tau = 0.5
    # Delta = (0.5 + 0.25, -0.5 + 0.25 + 0) = (0.75, -0.25)
    # L_0 = 0.25 * (1/0.5 - 0.75)^2 / 2 = 0.1953125;  L_1 = 0.25 * (-0.5/0.5 + 0.25)^2 / 3 = 0.046875
    loss, stats = pmd_loss(logp.requires_grad_(), old, adv, mask, tau=tau)
    assert loss.item() == pytest.approx((0.1953125 + 0.046875) / 2, abs=1e-12)
    assert stats["pmd/log_ratio"] == pytest.approx(0.25, abs=1e-12)
    assert stats["pmd/advantage_abs"] == pytest.approx(0.75, abs=1e-12)
    # d loss / d logp[i, t] = -(A_i - tau Delta_i) / (|y_i| B) on real tokens: -0.625/4 and 0.375/6.
    (grad,) = torch.autograd.grad(loss, logp)
    expect = torch.tensor([[-0.15625, -0.15625, 0, 0], [0.0625, 0.0625, 0.0625, 0]], dtype=DT)
    torch.testing.assert_close(grad, expect, atol=1e-12, rtol=0)


def test_padding_does_not_matter():
    logp, old, adv, mask = _hand_batch()
    base_loss, _ = pmd_loss(logp, old, adv, mask, tau=0.5)
    g = torch.Generator().manual_seed(7)
    junk = 100 * torch.randn(logp.shape, generator=g, dtype=DT)
    pad = mask == 0
    logp2 = torch.where(pad, junk, logp).requires_grad_()
    old2 = torch.where(pad, -junk, old)
    loss2, _ = pmd_loss(logp2, old2, adv, mask, tau=0.5)
    assert loss2.item() == pytest.approx(base_loss.item(), abs=1e-12)
    (grad2,) = torch.autograd.grad(loss2, logp2)
    assert (grad2[pad] == 0).all()
    # Extra all-padding columns (a longer batch) change nothing either.
    wide = lambda x, v: torch.cat([x, torch.full((2, 3), v, dtype=DT)], 1)  # noqa: E731
    loss3, _ = pmd_loss(wide(logp, 3.0), wide(old, -4.0), adv, wide(mask, 0.0), tau=0.5)
    assert float(loss3) == pytest.approx(float(base_loss), abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# 6. Registry.
# ---------------------------------------------------------------------------------------------------

def test_registry():
    assert REWARD_ADVANTAGES.get("rloo") is leave_one_out_mean
    assert REWARD_ADVANTAGES.get("ploo") is leave_one_out_partition
    assert POLICY_LOSSES.get("pmd") is pmd_loss
