"""Sequential PREDICT (smoothing.sequential): its error control on stub votes, early stopping, reproducibility."""
import math

import pytest
import torch

from models import STAMPED, Scanner, ScannerConfig
from smoothing import ABSTAIN, Smooth
from smoothing.sequential import look_levels, looks, sequential_decide

TRIALS, ALPHA, N = 20000, 0.05, 1000  # α large enough that its rate is measurable with TRIALS trials


def _stub(p: float, seed: int):
    """A base classifier whose every noisy copy votes positive with probability p, independently."""
    g = torch.Generator().manual_seed(seed)

    def sample(active, k):
        return torch.binomial(torch.full((len(active),), float(k)), torch.full((len(active),), p), generator=g).long()

    return sample


def _tolerance(rate: float) -> float:
    return 3 * math.sqrt(rate * (1 - rate) / TRIALS)  # three binomial standard deviations of the trials


def test_schedule_and_levels():
    assert looks(1000) == [32, 128, 512, 1000] and looks(32) == [32] and looks(10) == [10]
    levels = look_levels(4, ALPHA)
    assert sum(levels) == pytest.approx(ALPHA) and levels[-1] == ALPHA / 2 and look_levels(1, ALPHA) == [ALPHA]


@pytest.mark.parametrize("t", [0.5, 0.3])
@pytest.mark.parametrize("delta", [-0.05, -0.01, 0.0, 0.01, 0.05])
def test_wrong_decisive_verdicts_are_at_most_alpha(t, delta):
    p = t + delta
    verdicts, _, _ = sequential_decide(_stub(p, seed=int(1000 * (t + delta + 1))), TRIALS, N, t, ALPHA)
    decisive = verdicts >= 0
    if delta == 0:
        wrong = decisive  # at p = t any decisive verdict is wrong
    else:
        wrong = verdicts == (0 if delta > 0 else 1)
    rate = wrong.double().mean().item()
    assert rate <= ALPHA + _tolerance(ALPHA), (t, p, rate)


@pytest.mark.parametrize("p,verdict", [(0.0, 0), (1.0, 1)])
def test_lopsided_votes_stop_at_the_first_look(p, verdict):
    verdicts, votes, used = sequential_decide(_stub(p, seed=3), 50, N, 0.5, 0.001)
    assert (verdicts == verdict).all() and (used == 32).all() and (votes == (32 if p else 0)).all()


def test_a_coin_flip_runs_to_n_and_abstains():
    verdicts, _, used = sequential_decide(_stub(0.5, seed=4), 200, N, 0.5, 0.001)
    assert (used == N).float().mean() > 0.99 and (verdicts == -1).float().mean() > 0.99


def test_far_from_the_threshold_stops_early_and_is_right():
    verdicts, _, used = sequential_decide(_stub(0.8, seed=5), 200, N, 0.5, 0.001)
    assert (verdicts == 1).all() and used.max() <= 128


@pytest.fixture(scope="module")
def smooth():
    torch.manual_seed(0)
    return Smooth(Scanner(ScannerConfig("narrow")).eval(), 0.25)


def test_the_same_seed_gives_the_same_verdicts_and_n_used(smooth):
    x = torch.rand(3, 3, 24, 24)
    runs = [smooth.predict_sequential(x, 300, 0.001, 64, torch.Generator().manual_seed(9), positive=STAMPED)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    verdicts, votes, used = runs[0]
    assert set(verdicts.tolist()) <= {0, 1, ABSTAIN} and (votes <= used).all() and (used <= 300).all()


def test_votes_do_not_depend_on_how_copies_are_batched(smooth):
    x = torch.rand(3, 3, 24, 24)
    a = smooth.class_votes(x, 40, STAMPED, 7, torch.Generator().manual_seed(1))
    b = smooth.class_votes(x, 40, STAMPED, 120, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("n,p", [(32, 0.5), (128, 0.3), (1000, 0.5), (77, 0.9)])
def test_vectorised_pvalues_equal_scipys_binomtest(n, p):
    from scipy.stats import binomtest
    from smoothing.sequential import two_sided_pvalues
    ours = two_sided_pvalues(n, p)
    assert all(ours[k] == pytest.approx(binomtest(k, n, p).pvalue, rel=1e-9, abs=1e-300) for k in range(n + 1))


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_each_look_is_scipys_two_sided_test_at_its_share_of_alpha(t):
    """Scripted votes (image i: a fixed share q_i of every look's new copies): the verdict is decided at the first
    look whose cumulative votes reject p = t in scipy's two-sided binomtest at that look's level (α/(2(K−1)) before
    the last look, α/2 at it), positive when the share is above t; ABSTAIN when no look rejects. Exact."""
    from scipy.stats import binomtest
    shares = torch.linspace(0, 1, 41)
    alpha, n = 0.01, 1000

    def sample(active, k):
        return (shares[active] * k).round().long()

    verdicts, votes, used = sequential_decide(sample, len(shares), n, t, alpha)
    schedule, levels = looks(n), look_levels(len(looks(n)), alpha)
    assert schedule == [32, 128, 512, 1000] and levels == [alpha / 6] * 3 + [alpha / 2]
    for i, q in enumerate(shares.tolist()):
        total_votes, drawn, expected = 0, 0, (-1, n)
        for total, level in zip(schedule, levels):
            total_votes += round(q * (total - drawn))
            drawn = total
            if binomtest(total_votes, total, t).pvalue <= level:
                expected = (int(total_votes > t * total), total)
                break
        assert (verdicts[i].item(), used[i].item()) == expected, (q, t)
        assert votes[i].item() == total_votes
    assert set(verdicts.tolist()) == {-1, 0, 1} and len(set(used.tolist())) >= 3  # every branch was exercised
