"""Table 1's detection pass, exactly: every condition is applied to the photos the judge sees (with its documented
seed), clean and stamped alike, and each row's figures are what its verdicts say. Stubs only: CPU, milliseconds."""
import math
import warnings

import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from models import CLEAN, STAMPED
from report.conditions import table1_conditions
from report.detection import accuracy_row, common_size, detection_pass, mean_std
from report.judge import Judge
from smoothing import Smooth

SEED = 5


class AddStamp(nn.Module):
    """An encoder whose residual is a fixed +0.02 everywhere (so PSNR is known in closed form away from 1)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.full_like(x, 0.02)


class RecordingJudge:
    """Records every batch it judges; verdict STAMPED iff the mean red value exceeds 0.5, score that mean − 0.5."""

    def __init__(self):
        self.seen = []

    def __call__(self, x):
        self.seen.append(x.clone())
        score = x[:, 0].mean((1, 2)) - 0.5
        return torch.where(score > 0, STAMPED, CLEAN), score


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [0.2 + 0.6 * torch.rand(3, 3, 32, 32, generator=g), 0.2 + 0.6 * torch.rand(2, 3, 32, 32, generator=g)]


@pytest.fixture(scope="module")
def passed(batches):
    conditions = table1_conditions()
    judge = RecordingJudge()
    result = detection_pass(AddStamp(), judge, batches, conditions, "cpu", seed=SEED, keep=4)
    return conditions, judge, result


def test_every_condition_is_applied_to_what_the_judge_sees(batches, passed):
    """The judge sees, for batch b and the c-th condition, condition(clean) then condition(stamped) drawn under
    torch.manual_seed(seed·1,000,003 + b·1,009 + c); "none" sees the photos themselves. Exact, bit for bit; and
    every condition but "none" changes the photos (else its row would silently equal "none")."""
    conditions, judge, _ = passed
    seen = iter(judge.seen)
    for b, x in enumerate(batches):
        stamped = (x + 0.02).clamp(0, 1)
        for c, (name, condition) in enumerate(conditions.items()):
            torch.manual_seed(SEED * 1_000_003 + b * 1_009 + c)
            for images in (x, stamped):
                expected = images if condition is None else condition(images)
                got = next(seen)
                assert torch.equal(got, expected), (name, b)
                if condition is not None:
                    assert not torch.equal(got, images), f"{name} left the photos as they were"
    assert next(seen, None) is None


def test_rows_hold_the_judges_verdicts_and_scores_clean_and_stamped_apart(batches, passed):
    conditions, judge, result = passed
    per_call = [RecordingJudge()(images) for images in judge.seen]  # the same rule on what was judged
    n_conditions = len(conditions)
    for c, name in enumerate(conditions):
        for i in (0, 1):  # clean, stamped
            calls = [per_call[b * 2 * n_conditions + 2 * c + i] for b in range(len(batches))]
            assert torch.equal(result["verdicts"][name][i], torch.cat([v for v, _ in calls])), (name, i)
            assert torch.equal(result["scores"][name][i], torch.cat([s for _, s in calls])), (name, i)
    x = torch.cat(batches)
    stamped = (x + 0.02).clamp(0, 1)
    mse = (stamped - x).pow(2).mean((1, 2, 3))
    assert result["psnr"] == pytest.approx((-10 * torch.log10(mse)).tolist(), rel=1e-5)
    assert torch.equal(result["kept"][0], x[:4]) and torch.equal(result["kept"][1], stamped[:4])
    assert result["lpips"] is None


def test_accuracy_row_counts_clean_read_clean_and_stamped_read_stamped():
    clean_v = torch.tensor([CLEAN, CLEAN, CLEAN, STAMPED, -1])
    stamped_v = torch.tensor([STAMPED, CLEAN, STAMPED, STAMPED])
    clean_s, stamped_s = torch.tensor([-2.0, -1.0, -0.5, 0.5, 0.0]), torch.tensor([3.0, -1.5, 1.0, 2.0])
    row = accuracy_row(clean_v, stamped_v, clean_s, stamped_s)
    # AUC: the share of (clean, stamped) pairs whose stamped score is higher, ties counting one half
    pairs = [(c, s) for c in clean_s.tolist() for s in stamped_s.tolist()]
    expected_auc = (sum(s > c for c, s in pairs) + 0.5 * sum(s == c for c, s in pairs)) / len(pairs)
    assert row == {"acc_clean": 0.6, "acc_stamped": 0.75, "acc": pytest.approx(0.675), "abstain": 1 / 9,
                   "auc": pytest.approx(expected_auc), "n": 5}
    only_clean = accuracy_row(clean_v, torch.empty(0, dtype=torch.long), clean_s, torch.empty(0))
    assert only_clean == {"acc_clean": 0.6, "acc_stamped": None, "acc": None, "fpr": 0.2, "abstain": 0.2,
                          "auc": None, "n": 5}


def test_common_size_centre_crops_every_batch_to_the_smallest_height_and_width():
    tall, wide = torch.arange(1 * 3 * 9 * 6.0).reshape(1, 3, 9, 6), torch.arange(2 * 3 * 5 * 10.0).reshape(2, 3, 5, 10)
    out = common_size([tall, wide])
    assert out.shape == (3, 3, 5, 6)
    assert torch.equal(out[:1], tall[..., 2:7, :]) and torch.equal(out[1:], wide[..., :, 2:8])
    assert torch.equal(common_size([wide, wide]), torch.cat([wide, wide]))
    assert common_size([]).shape == (0,)


def test_mean_std_over_photos():
    assert mean_std(torch.tensor([1.0, 2.0, 4.0])) == {"mean": pytest.approx(7 / 3),
                                                       "std": pytest.approx(math.sqrt(7 / 3)), "n": 3}  # Bessel
    assert mean_std(torch.tensor([1.0, 3.0]))["std"] == pytest.approx(math.sqrt(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one photo: no std, and none of torch's degrees-of-freedom warnings either
        one = mean_std(torch.tensor([5.0]))
    empty, missing = mean_std(torch.empty(0)), mean_std(None)
    assert one["mean"] == 5.0 and math.isnan(one["std"]) and one["n"] == 1
    for row in (empty, missing):
        assert set(row) == {"mean", "std", "n"} and math.isnan(row["mean"]) and math.isnan(row["std"]) and row["n"] == 0


def test_table1_conditions_have_the_strengths_their_names_state():
    """Each fixed-strength condition is its registry module with a one-point range equal to what its name says,
    so that a wrong constant (rotation 30° in the 15° row, JPEG q75 in the q90 row) is caught."""
    c = table1_conditions()
    assert list(c)[0] == "none" and c["none"] is None
    expected = {
        "rotation ±15°": ("degrees", (15.0, 15.0)), "rotation ±30°": ("degrees", (30.0, 30.0)),
        "crop 70% of the area": ("scale", (0.7, 0.7)), "crop 50% of the area": ("scale", (0.5, 0.5)),
        "Gaussian blur 7×7, σ 2": ("sigma", (2.0, 2.0)),
        "defocus radius 3 (ImageNet-C 1)": ("radius", (3.0, 3.0)),
        "defocus radius 6 (ImageNet-C 3)": ("radius", (6.0, 6.0)),
        "perspective 0.1": ("distortion", (0.1, 0.1)), "perspective 0.2": ("distortion", (0.2, 0.2)),
        "pixel noise σ 0.05": ("std", (0.05, 0.05)), "pixel noise σ 0.1": ("std", (0.1, 0.1)),
        "resize to 50%": ("scale", (0.5, 0.5)), "resize to 25%": ("scale", (0.25, 0.25)),
        "JPEG q90": ("quality", (90.0, 90.0)), "JPEG q75": ("quality", (75.0, 75.0)),
        "JPEG q50": ("quality", (50.0, 50.0)),
    }
    for name, (attribute, value) in expected.items():
        assert tuple(getattr(c[name], attribute)) == pytest.approx(value), name
    assert c["Gaussian blur 7×7, σ 2"].kernel_size == (7, 7)
    assert all(c[name].mode == "real" for name in ("JPEG q90", "JPEG q75", "JPEG q50"))
    jitter = c["colour jitter ≤ 0.3, hue ≤ 0.1"]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.3, 0.3, 0.3, 0.1)
    mixed = c["mixed chain (JPEG q75)"]
    assert mixed.p == 1.0 and [m.name for m in mixed.corruptions] == ["jitter", "crop", "gaussian_blur", "rotation",
                                                                       "perspective", "jpeg"]
    assert mixed.corruptions[-1].quality == (75.0, 75.0) and mixed.corruptions[-1].mode == "real"
    assert len(c) == 1 + len(expected) + 2


class MeanScanner(nn.Module):
    """logits [0, 40·(mean − 0.5)]: reads STAMPED when the image's mean exceeds ½; under noise σ = 0.25 on a 4×4
    image its votes are mixed for means near ½."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(40.0), requires_grad=False)

    def forward(self, x):
        score = self.scale * (x.mean((1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], 1)


def _images():
    """Flat 4×4 images whose means put their vote shares on both sides of ½, some close to it."""
    return torch.tensor([0.42, 0.49, 0.494, 0.506, 0.51, 0.58]).view(6, 1, 1, 1).expand(6, 3, 4, 4).contiguous()


def test_the_plain_judge_is_the_argmax_and_the_logit_difference():
    x = _images()
    verdicts, scores = Judge(MeanScanner(), batch_size=4)(x)
    expected = 40 * (x.mean((1, 2, 3)) - 0.5)
    assert torch.equal(verdicts, (expected > 0).long()) and torch.allclose(scores, expected)


@pytest.mark.parametrize("sequential", [False, True])
def test_the_smoothed_judge_is_predict_on_its_own_seeded_noise(sequential):
    """Smoothed: Cohen's PREDICT (two-sided test at alpha) on n copies drawn from one generator seeded with the
    judge's seed and kept across calls, score = the share of STAMPED votes; or sequential PREDICT likewise."""
    x, n, alpha, seed = _images(), 200, 0.05, 3
    judge = Judge(MeanScanner(), sigma=0.25, n=n, alpha=alpha, batch_size=64, seed=seed, sequential=sequential)
    got = [judge(x[:3]), judge(x[3:])]  # two calls: the generator carries on
    smooth, generator = Smooth(MeanScanner(), 0.25), torch.Generator().manual_seed(seed)
    if sequential:
        expected, n_used = [], []
        for part in (x[:3], x[3:]):
            verdicts, votes, used = smooth.predict_sequential(part, n, alpha, 64, generator, positive=STAMPED)
            expected.append((verdicts, (votes.double() / used).float()))
            n_used += used.tolist()
        assert judge.n_used == n_used and max(n_used) > 32  # some photo needed more than the first look
    else:
        counts = [smooth.counts(image, n, 64, generator) for image in x]
        pvalues = [binomtest(int(c[STAMPED]), n).pvalue for c in counts]
        # the test can tell a test at alpha from one at 2·alpha or alpha/2: some p-values lie between them
        assert any(alpha < p <= 2 * alpha for p in pvalues) and any(alpha / 2 < p <= alpha for p in pvalues)
        verdicts = torch.tensor([Smooth.decide(c, alpha) for c in counts])
        scores = torch.tensor([float(c[STAMPED]) / n for c in counts])
        expected = [(verdicts[:3], scores[:3]), (verdicts[3:], scores[3:])]
        assert judge.n_used == [n] * 6
    for (v, s), (ev, es) in zip(got, expected):
        assert torch.equal(v, ev) and torch.equal(s, es)
    all_verdicts = torch.cat([v for v, _ in got]).tolist()
    assert {0, 1} <= set(all_verdicts)  # the photos span both sides
