"""Sequential PREDICT (smoothing.sequential): its error control on stub votes, early stopping, reproducibility."""
import math

import pytest
import torch

from models import STAMPED, Scanner, ScannerConfig
from report.judge import Judge
from smoothing import ABSTAIN, Smooth
from smoothing.sequential import (first_look, look_levels, look_schedule, looks, sequential_decide,
                                  two_sided_pvalues)

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
    assert looks(1000) == [16, 64, 256, 1000] and looks(16) == [16] and looks(10) == [10]
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
    assert (verdicts == verdict).all() and (used == 16).all() and (votes == (16 if p else 0)).all()


def test_a_coin_flip_runs_to_n_and_abstains():
    verdicts, _, used = sequential_decide(_stub(0.5, seed=4), 200, N, 0.5, 0.001)
    assert (used == N).float().mean() > 0.99 and (verdicts == -1).float().mean() > 0.99


def test_far_from_the_threshold_stops_early_and_is_right():
    verdicts, _, used = sequential_decide(_stub(0.8, seed=5), 200, N, 0.5, 0.001)
    assert (verdicts == 1).all() and used.max() <= 256


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


@pytest.mark.parametrize("n,p", [(32, 0.5), (128, 0.3), (1000, 0.5), (77, 0.9), (2048, 0.5)])
def test_vectorised_pvalues_equal_scipys_binomtest(n, p):
    """Also at 2,048 copies (a look of n = 100,000), where the least likely outcomes' probabilities underflow to 0."""
    from scipy.stats import binomtest
    ours = two_sided_pvalues(n, p)
    assert ours.shape == (n + 1,) and ours.max() <= 1.0
    assert all(ours[k] == pytest.approx(binomtest(k, n, p).pvalue, rel=1e-9, abs=1e-300) for k in range(n + 1))


@pytest.mark.parametrize("t,first", [(0.5, 16), (0.3, 32), (0.7, 32), (0.9, 128)])
def test_a_unanimous_vote_either_way_stops_at_the_first_look_which_is_as_early_as_that_allows(t, first):
    assert first_look(1000, t, 0.001) == first
    for unanimous, verdict in [(lambda a, k: torch.full((len(a),), k), 1), (lambda a, k: torch.zeros(len(a)), 0)]:
        verdicts, _, used = sequential_decide(unanimous, 2, 1000, t, 0.001)
        assert verdicts.tolist() == [verdict] * 2 and used.tolist() == [first] * 2, (t, verdict)
    if first > 16:  # half as many copies could not have decided both ways at that look's level
        earlier = first // 2
        level = look_levels(len(looks(1000, earlier)), 0.001)[0]
        assert max(two_sided_pvalues(earlier, t)[[0, earlier]]) > level
    assert first_look(10, t, 0.001) == 10  # n below the smallest look: one look at n
    assert look_schedule(1000, t, 0.001) == looks(1000, first)


def test_the_judge_names_the_looks_it_takes(smooth):
    assert "(looks at 16, 64, 256, 1000 copies)" in Judge(smooth.scanner, 0.25, 1000, 0.001).describe()
    assert "(looks at 32, 128, 512, 1000 copies)" in Judge(smooth.scanner, 0.25, 1000, 1e-5).describe()
    assert "looks" not in Judge(smooth.scanner, 0.25, 1000, 0.001, sequential=False).describe()


def test_at_a_threshold_of_0_or_1_there_is_one_look_at_n():
    assert look_schedule(1000, 0.0, 0.001) == look_schedule(1000, 1.0, 0.001) == [1000]
    calls = []
    sequential_decide(_recording(0.5, 0, calls), 2, 100, 0.0, 0.001)
    assert calls == [100]


def test_looks_refuses_what_has_no_schedule():
    assert looks(1, 1, 2) == [1] and looks(9, 1, 2) == [1, 2, 4, 8, 9]
    for n, first, factor in [(0, 1, 2), (1, 0, 2), (1, 1, 1)]:
        with pytest.raises(ValueError, match=rf"^looks: need n ≥ 1, first ≥ 1 and factor ≥ 2, got n {n}, "
                                             rf"first {first}, factor {factor}$"):
            looks(n, first, factor)


def _recording(p: float, seed: int, calls: list):
    sample = _stub(p, seed)
    return lambda active, k: calls.append(k) or sample(active, k)


def test_defaults_are_predict_at_one_half_and_alpha_0_001_over_the_schedule_asked_for():
    calls = []
    verdicts, votes, used = sequential_decide(_recording(0.5, 0, calls), 3, 100, first=4, factor=3)
    assert calls == [4, 8, 24, 64] and used.tolist() == [100] * 3  # cumulative 4, 12, 36, 100
    assert verdicts.tolist() == [ABSTAIN] * 3  # a fair coin never clears alpha 0.001 in 100 draws
    assert verdicts.dtype == votes.dtype == used.dtype == torch.int64
    # alpha is the caller's: 12 of 12 positive is decisive at 0.001 (p = 0.00049), 9 of 12 only at 0.2 (p 0.146)
    assert sequential_decide(lambda a, k: torch.full((len(a),), k), 1, 12)[0].tolist() == [1]
    assert sequential_decide(lambda a, k: torch.full((len(a),), 9), 1, 12)[0].tolist() == [ABSTAIN]
    assert sequential_decide(lambda a, k: torch.full((len(a),), 9), 1, 12, alpha=0.2)[0].tolist() == [1]


def test_a_p_value_equal_to_the_looks_level_is_decisive():
    level = float(two_sided_pvalues(16, 0.5)[13])  # one look of 16 copies: its level is all of alpha
    verdicts, _, _ = sequential_decide(lambda a, k: torch.full((len(a),), 13), 1, 16, 0.5, level)
    assert verdicts.tolist() == [1]
    verdicts, _, _ = sequential_decide(lambda a, k: torch.full((len(a),), 13), 1, 16, 0.5, math.nextafter(level, 0))
    assert verdicts.tolist() == [ABSTAIN]


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_thresholds_0_and_1_draw_all_n_copies_at_once_and_compare_the_share(t):
    """Nothing to test at t = 0 or 1: one look of n copies, verdict positive when the share is above t (a share of
    exactly t is not above it)."""
    calls = []
    for positives, expected in [(0, 0), (7, int(t < 1)), (50, 0 if t == 1 else 1)]:
        verdicts, votes, used = sequential_decide(lambda a, k: calls.append(k) or torch.full((len(a),), positives),
                                                  2, 50, t)
        assert verdicts.tolist() == [expected] * 2 and votes.tolist() == [positives] * 2 and used.tolist() == [50] * 2
    assert calls == [50, 50, 50]


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
    # the first look: 16 at ½; at 0.3, 0 of 16 is not decisive (p 0.0049 > α/6), 0 of 32 is
    schedule = look_schedule(n, t, alpha)
    levels = look_levels(len(schedule), alpha)
    assert schedule == {0.5: [16, 64, 256, 1000], 0.3: [32, 128, 512, 1000]}[t]
    assert levels == [alpha / 6] * 3 + [alpha / 2]
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
