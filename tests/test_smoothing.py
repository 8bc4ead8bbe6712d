"""Randomized smoothing: Smooth's statistics on stub classifiers, the noise view, train_rs.py and the certify CLI."""
import inspect
import json
import math

import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

import train_rs
from models import Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, save_pretrained
from smoothing import ABSTAIN, Smooth, gaussian_noise_view, lower_confidence_bound
from smoothing.certify import (RADII, TSV_COLUMNS, CertifyRow, certified_accuracy, format_table, read_tsv,
                               write_tsv)
from smoothing.certify import main as certify_main
from conftest import TINY_TRAIN_FLAGS as TINY, tensorboard_tags

SHAPE = (3, 4, 4)  # a tiny "image": the statistics do not depend on its size


class LinearStub(nn.Module):
    """logits = [0, w·x - b]: class 1 exactly when w·x > b. Under x + ε, ε ~ N(0, σ²I),
    P(class 1) = Φ((w·x - b) / (σ‖w‖)) in closed form. Records the largest batch it is given."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w)
        self.b = b
        self.max_batch = 0
        self.calls = 0

    def forward(self, x):
        self.max_batch = max(self.max_batch, x.shape[0])
        self.calls += 1
        score = x.flatten(1) @ self.w - self.b
        return torch.stack([torch.zeros_like(score), score], 1)


class CoinStub(nn.Module):
    """Answers class 0 or 1 at random, whatever the input, from its own seeded generator."""

    def __init__(self, seed=0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x):
        return torch.randn(x.shape[0], 2, generator=self.generator)


def linear_case(p_class1: float, sigma: float):
    """A fixed image, and a LinearStub whose probability of answering class 1 under noise σ is p_class1."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(SHAPE, generator=g)
    w = torch.randn(x.numel(), generator=g)
    b = float(w @ x.flatten()) - float(norm.ppf(p_class1)) * sigma * float(w.norm())
    return x, LinearStub(w, b)


def replay_counts(stub: LinearStub, x: torch.Tensor, sigma: float, sizes: list[int], seed: int) -> list[int]:
    """Class-1 counts of consecutive runs of `sizes` noisy copies, drawn here from a generator seeded `seed` as
    Smooth draws them (one standard normal per pixel, batch after batch, scaled by σ and added to x) and read by
    the stub's own rule (w·v > b), independently of Smooth's counting."""
    g = torch.Generator().manual_seed(seed)
    counts = []
    for size in sizes:
        noise = torch.empty(size, *x.shape).normal_(generator=g)
        counts.append(int(((noise * sigma + x).flatten(1) @ stub.w - stub.b > 0).sum()))
    return counts


@pytest.mark.parametrize("p_class1, expected_class", [(0.9, 1), (0.2, 0)])
def test_certified_radius_is_sigma_times_the_normal_quantile_of_the_clopper_pearson_bound(p_class1, expected_class):
    """Exact: the counts are replayed from the same seeded draws, and the radius recomputed from them with scipy's
    closed forms, σ·Φ⁻¹(beta.ppf(alpha, nA, n − nA + 1)); a bound at 2·alpha or alpha/2, noise not scaled by σ,
    or the estimation reusing the selection draws gives another number."""
    sigma, n0, n, alpha, batch = 0.5, 100, 20_000, 0.001, 1000
    x, stub = linear_case(p_class1, sigma)
    predict, radius = Smooth(stub, sigma).certify(x, n0=n0, n=n, alpha=alpha, batch_size=batch,
                                                  generator=torch.Generator().manual_seed(0))
    selection, *estimation = replay_counts(stub, x, sigma, [n0] + [batch] * (n // batch), seed=0)
    assert expected_class == int(selection > n0 - selection) == predict
    n_a = sum(estimation) if expected_class == 1 else n - sum(estimation)
    p_lower = binomtest(n_a, n, alternative="greater").proportion_ci(1 - alpha, method="exact").low
    assert radius == pytest.approx(sigma * norm.ppf(p_lower), rel=1e-12)
    assert radius == pytest.approx(sigma * norm.ppf(beta.ppf(alpha, n_a, n - n_a + 1)), rel=1e-12)
    for wrong in (2 * alpha, alpha / 2):  # what the bound at another level would have given: far from it
        assert abs(radius - sigma * norm.ppf(beta.ppf(wrong, n_a, n - n_a + 1))) > 1e-3
    assert stub.max_batch <= batch


class ScriptedStub(nn.Module):
    """Answers the classes of a fixed script, one per input image, in order, whatever the input."""

    def __init__(self, answers):
        super().__init__()
        self.answers = list(answers)

    def forward(self, x):
        classes = torch.tensor(self.answers[:x.shape[0]])
        del self.answers[:x.shape[0]]
        return torch.nn.functional.one_hot(classes, 3).float()


@pytest.mark.parametrize("n_a, n, alpha", [(1, 10, 0.05), (37, 50, 0.001), (9, 10, 0.1), (990, 1000, 0.001),
                                           (1000, 1000, 0.01), (5100, 10000, 0.2)])
def test_the_lower_confidence_bound_is_one_sided_clopper_pearson_at_alpha(n_a, n, alpha):
    """Three independent characterisations: scipy's exact one-sided interval at 1 − alpha, the lower end of the
    exact two-sided interval at 1 − 2·alpha (Cohen's proportion_confint(alpha=2·alpha)), and its definition,
    P(Binomial(n, p_lower) ≥ nA) = alpha."""
    bound = lower_confidence_bound(n_a, n, alpha)
    one_sided = binomtest(n_a, n, alternative="greater").proportion_ci(1 - alpha, method="exact").low
    two_sided = binomtest(n_a, n).proportion_ci(1 - 2 * alpha, method="exact").low
    assert bound == pytest.approx(one_sided, rel=1e-12) and bound == pytest.approx(two_sided, rel=1e-9)
    assert binom.sf(n_a - 1, n, bound) == pytest.approx(alpha, rel=1e-6)
    assert lower_confidence_bound(0, n, alpha) == 0.0


@pytest.mark.parametrize("n_a, n0_votes", [(920, 40), (80, 3), (500, 10)])
def test_certify_selects_on_n0_copies_and_bounds_on_n_fresh_ones(n_a, n0_votes):
    """A scripted base classifier: n0 = 50 selection answers (n0_votes of them class 1, the rest class 0), then
    n = 1000 estimation answers (n_a class 1, then class 0, then class 2). The class is the selection's majority,
    its radius σ·Φ⁻¹ of the bound on its count among the fresh n; ABSTAIN when that bound is below ½."""
    n0, n, sigma, alpha = 50, 1000, 0.25, 0.001
    estimation = [1] * n_a + [0] * (n - n_a - 5) + [2] * 5
    stub = ScriptedStub([1] * n0_votes + [0] * (n0 - n0_votes) + estimation)
    predict, radius = Smooth(stub, sigma).certify(torch.zeros(SHAPE), n0=n0, n=n, alpha=alpha, batch_size=64)
    selected = 1 if n0_votes > n0 - n0_votes else 0
    count = estimation.count(selected)
    p_lower = float(beta.ppf(alpha, count, n - count + 1))
    if p_lower < 0.5:
        assert (predict, radius) == (ABSTAIN, 0.0)
    else:
        assert predict == selected and radius == pytest.approx(sigma * norm.ppf(p_lower), rel=1e-12)
    assert stub.answers == []  # exactly n0 + n copies were classified


def test_predict_uses_the_two_sided_binomial_test():
    """Every split of n = 60 votes between two classes: PREDICT answers the majority exactly when scipy's
    two-sided binomial test against ½ rejects at alpha. Some splits are significant one-sided but not two-sided:
    there a one-sided test would answer and PREDICT must abstain."""
    n, alpha = 60, 0.01
    one_sided_only = 0
    for k in range(n + 1):
        two = binomtest(k, n, 0.5).pvalue
        one = binomtest(max(k, n - k), n, 0.5, alternative="greater").pvalue
        one_sided_only += one <= alpha < two
        expected = (1 if k > n - k else 0) if two <= alpha else ABSTAIN
        assert Smooth.decide(torch.tensor([n - k, k]), alpha) == expected, k
        stub = ScriptedStub([1] * k + [0] * (n - k))
        assert Smooth(stub, 0.25).predict(torch.zeros(SHAPE), n=n, alpha=alpha, batch_size=7) == expected, k
    assert one_sided_only == 2  # 20 and 40 of 60: one-sided p 0.0067, two-sided 0.0135
    assert Smooth.decide(torch.tensor([20, 40]), alpha) == ABSTAIN and Smooth.decide(torch.tensor([19, 41]), alpha) == 1
    # the top two of three classes are compared: 9 against 1 (two-sided p 0.021), not against 0
    assert Smooth.decide(torch.tensor([0, 9, 1]), 0.05) == 1 and Smooth.decide(torch.tensor([1, 0, 9]), 0.05) == 2


def test_a_classifier_that_answers_at_random_abstains():
    smooth = Smooth(CoinStub(seed=0), sigma=0.25)
    x = torch.rand(SHAPE)
    g = torch.Generator().manual_seed(0)
    assert smooth.predict(x, n=1000, alpha=0.001, batch_size=256, generator=g) == ABSTAIN
    assert smooth.certify(x, n0=100, n=1000, alpha=0.001, batch_size=256, generator=g) == (ABSTAIN, 0.0)


def test_predict_returns_a_clear_majority():
    x, stub = linear_case(0.95, sigma=0.25)
    assert Smooth(stub, 0.25).predict(x, n=500, alpha=0.001, generator=torch.Generator().manual_seed(0)) == 1


def test_a_smaller_alpha_never_certifies_a_larger_radius():
    sigma = 0.5
    x, stub = linear_case(0.99, sigma)
    smooth = Smooth(stub, sigma)
    radii = [smooth.certify(x, n0=100, n=2000, alpha=alpha, batch_size=500,
                            generator=torch.Generator().manual_seed(3))[1]
             for alpha in (0.1, 0.01, 0.001, 1e-4, 1e-6)]
    assert all(later <= earlier for earlier, later in zip(radii, radii[1:])), radii
    assert radii[-1] < radii[0]


def test_the_same_generator_seed_gives_the_same_result():
    scanner = Scanner(ScannerConfig("narrow"))
    smooth = Smooth(scanner, 0.5)
    x = torch.rand(3, 16, 16)

    def certify(seed):
        generator = torch.Generator().manual_seed(seed)
        return smooth.certify(x, n0=20, n=100, alpha=0.01, batch_size=32, generator=generator)

    assert certify(7) == certify(7)
    assert torch.equal(smooth._sample_counts(x, 50, 16, torch.Generator().manual_seed(7)),
                       smooth._sample_counts(x, 50, 16, torch.Generator().manual_seed(7)))
    stub_x, stub = linear_case(0.6, 0.5)  # a balanced vote, so that other noise gives other counts
    counts = [Smooth(stub, 0.5)._sample_counts(stub_x, 1000, 100, torch.Generator().manual_seed(seed))
              for seed in (1, 2)]
    assert not torch.equal(*counts)


def test_sampling_is_batched_and_counts_every_sample():
    x, stub = linear_case(0.7, 0.5)
    counts = Smooth(stub, 0.5)._sample_counts(x, 1001, 100, torch.Generator().manual_seed(0))
    assert counts.shape == (2,) and counts.dtype == torch.int64 and counts.device.type == "cpu"
    assert int(counts.sum()) == 1001
    assert stub.max_batch == 100 and stub.calls == 11  # never all 1001 noisy copies at once


def test_input_forms_device_and_mode():
    x, stub = linear_case(0.9, 0.5)
    stub.train()
    smooth = Smooth(stub, 0.5)
    assert smooth.device == stub.w.device
    a = smooth.certify(x, n0=10, n=100, generator=torch.Generator().manual_seed(0))
    b = smooth.certify(x[None], n0=10, n=100, generator=torch.Generator().manual_seed(0))
    assert a == b  # (3,H,W) and (1,3,H,W) are the same image
    assert stub.training  # the caller's mode is restored


@pytest.mark.parametrize("kwargs, name", [({"n0": 0}, "n0"), ({"n": 0}, "n"), ({"alpha": 0.0}, "alpha"),
                                          ({"alpha": 1.0}, "alpha"), ({"batch_size": 0}, "batch_size"),
                                          ({"n": 10.5}, "n")])
def test_bad_arguments_are_refused_by_name(kwargs, name):
    x, stub = linear_case(0.9, 0.5)
    with pytest.raises(ValueError, match=name):
        Smooth(stub, 0.5).certify(x, **kwargs)


def test_bad_sigma_and_image_are_refused():
    x, stub = linear_case(0.9, 0.5)
    for sigma in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            Smooth(stub, sigma)
    with pytest.raises(ValueError, match="one image"):
        Smooth(stub, 0.5).predict(torch.rand(2, *SHAPE), n=10)
    with pytest.raises(ValueError, match="floating-point"):
        Smooth(stub, 0.5).predict((x * 255).to(torch.uint8), n=10)


def test_paper_defaults():
    """Cohen's defaults (n0 100, n 100,000, alpha 0.001, batches of 400) in every entry point that takes them."""
    from smoothing.core import threshold_radius
    cohen = {"n0": 100, "n": 100_000, "alpha": 0.001, "batch_size": 400}
    for fn in (Smooth.certify, Smooth.predict, Smooth.counts, Smooth.decide, threshold_radius):
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if k in cohen and p.default is not p.empty}
        assert defaults == {k: cohen[k] for k in defaults} and defaults, fn.__qualname__
    assert Smooth.decide(torch.tensor([12, 0])) == 0 and Smooth.decide(torch.tensor([11, 1])) == ABSTAIN  # α 0.001
    sequential = inspect.signature(Smooth.predict_sequential).parameters  # sequential PREDICT: at most 1,000 copies
    assert {k: sequential[k].default for k in ("n", "alpha", "batch_size", "threshold", "positive")} == {
        "n": 1000, "alpha": 0.001, "batch_size": 400, "threshold": 0.5, "positive": 1}


class Tally(nn.Module):
    """Answers class 1 for every input and tallies how many inputs it saw and its largest batch."""

    def __init__(self):
        super().__init__()
        self.seen, self.max_batch = 0, 0

    def forward(self, x):
        self.seen += x.shape[0]
        self.max_batch = max(self.max_batch, x.shape[0])
        return torch.tensor([[0.0, 1.0]]).expand(x.shape[0], 2)


@pytest.mark.parametrize("call, copies", [
    (lambda smooth, x: smooth.certify(x), 100 + 100_000), (lambda smooth, x: smooth.predict(x), 100_000),
    (lambda smooth, x: smooth.counts(x), 100_000), (lambda smooth, x: smooth.predict_sequential(x), 16)])
def test_called_with_no_settings_each_draws_cohens_numbers_of_copies_in_batches_of_400(call, copies):
    """Sequential PREDICT (at most 1,000 copies) stops at its first look: 16 of 16 copies STAMPED."""
    tally = Tally()
    result = call(Smooth(tally, 0.25), torch.zeros(SHAPE))
    assert tally.seen == copies and tally.max_batch == min(400, copies)
    if isinstance(result, tuple) and len(result) == 3:
        assert result[0].tolist() == [1] and result[2].tolist() == [16]
        stub, batches = CoinStub(seed=0), []
        stub.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
        coin = Smooth(stub, 0.25).predict_sequential(torch.zeros(SHAPE))  # undecided: all 1,000 copies
        assert coin[0].tolist() == [ABSTAIN] and coin[2].tolist() == [1000] and max(batches) == 400


def test_sequential_predict_passes_its_settings_on(monkeypatch):
    seen = {}

    def spy(sample, batch, n, threshold, alpha):
        seen.update(batch=batch, n=n, threshold=threshold, alpha=alpha)
        return torch.tensor([1]), torch.tensor([5]), torch.tensor([7])

    monkeypatch.setattr("smoothing.core.sequential_decide", spy)
    x, stub = linear_case(0.9, 0.5)
    verdicts, _, _ = Smooth(stub, 0.5).predict_sequential(x, n=77, alpha=0.02, threshold=0.3, positive=0)
    assert seen == {"batch": 1, "n": 77, "threshold": 0.3, "alpha": 0.02} and verdicts.tolist() == [0]


def test_chunks_are_by_pixels_per_device_and_never_empty():
    from smoothing.core import CPU_CHUNK_PIXELS, DEVICE_CHUNK_PIXELS, chunk_size
    assert chunk_size(torch.device("cpu"), 100, 40) == CPU_CHUNK_PIXELS // 4000
    assert chunk_size(torch.device("cuda"), 100, 40) == DEVICE_CHUNK_PIXELS // 4000 != CPU_CHUNK_PIXELS // 4000
    assert chunk_size(torch.device("cpu"), 4000, 3000) == 1


def test_one_copy_is_a_count_and_a_wrong_alpha_is_named():
    x, stub = linear_case(0.9, 0.5)
    assert int(Smooth(stub, 0.5).counts(x, n=1, batch_size=1).sum()) == 1
    with pytest.raises(ValueError, match=r"^Smooth: alpha must be a number in \(0, 1\), got 'x'$"):
        Smooth(stub, 0.5).predict(x, alpha="x")
    with pytest.raises(ValueError, match=r"^Smooth: alpha must be in \(0, 1\), got 1.5$"):
        Smooth(stub, 0.5).predict(x, alpha=1.5)


def test_a_p_value_equal_to_alpha_is_significant():
    """Cohen's PREDICT abstains only when the p-value exceeds alpha; a lone class is tested against 0 votes."""
    alpha = binomtest(40, 50).pvalue
    assert Smooth.decide(torch.tensor([10, 40]), alpha) == 1
    assert Smooth.decide(torch.tensor([10, 40]), math.nextafter(alpha, 0)) == ABSTAIN
    assert Smooth.decide(torch.tensor([5]), 0.1) == 0  # binomtest(5, 5): p 0.0625; against 1 vote it would be 0.22


def test_predict_counts_certify_and_the_cli_helpers_pass_every_setting_on(monkeypatch):
    """What the caller asks for (sample counts, alpha, batch size, generator, first row index) is what is used:
    spies stand in for the layer below and record their arguments."""
    from smoothing.certify import certify_images, certify_labelled
    x, stub = linear_case(0.9, 0.5)
    smooth = Smooth(stub, 0.5)
    g = torch.Generator().manual_seed(0)
    seen = []
    real_counts = smooth.counts
    monkeypatch.setattr(smooth, "counts", lambda *a, **k: seen.append((a, k)) or real_counts(*a, **k))
    smooth.predict(x, n=37, alpha=0.01, batch_size=9, generator=g)
    assert seen == [((x, 37, 9, g), {})]

    calls = []
    monkeypatch.setattr(smooth, "certify", lambda image, **k: calls.append(k) or (1, 0.5))
    settings = dict(n0=7, n=33, alpha=0.02, batch_size=5, generator=g)
    rows = list(certify_labelled(smooth, [(x, 1), (x, 0)], start_idx=4, **settings))
    assert [r.idx for r in rows] == [4, 5] and calls == [settings, settings]
    assert all(0 <= r.time < 60 for r in rows)  # seconds spent on each
    calls.clear()
    encoder = StampEncoder(StampEncoderConfig(width=0.25))
    rows = list(certify_images(encoder, smooth, [torch.rand(3, 16, 16)], **settings))
    assert [(r.idx, r.label) for r in rows] == [(0, 0), (1, 1)] and calls == [settings, settings]


@pytest.mark.parametrize("method, kwargs, name", [
    (method, kwargs, name) for method in ("certify", "predict", "counts", "predict_sequential")
    for kwargs, name in [({"n": 0}, "n"), ({"n": 2.0}, "n"), ({"batch_size": 0}, "batch_size"),
                         ({"batch_size": True}, "batch_size")]] + [("certify", {"n0": 0}, "n0")])
def test_bad_counts_are_refused_with_their_name(method, kwargs, name):
    x, stub = linear_case(0.9, 0.5)
    with pytest.raises(ValueError, match=rf"^Smooth: {name} must be an integer ≥ 1, got "):
        getattr(Smooth(stub, 0.5), method)(x, **kwargs)


def test_a_bound_of_exactly_one_half_certifies_the_class_at_radius_zero(monkeypatch):
    """Cohen's CERTIFY abstains only when pA < ½; at pA = ½ it answers the class with radius σ·Φ⁻¹(½) = 0."""
    x, stub = linear_case(0.9, 0.5)
    monkeypatch.setattr("smoothing.core.lower_confidence_bound", lambda k, n, alpha: 0.5)
    assert Smooth(stub, 0.5).certify(x, n0=10, n=20, generator=torch.Generator().manual_seed(0)) == (1, 0.0)


def test_sequential_predict_takes_one_image_or_a_batch():
    x, stub = linear_case(0.9, 0.5)
    one = Smooth(stub, 0.5).predict_sequential(x, n=200, generator=torch.Generator().manual_seed(0))
    batch = Smooth(stub, 0.5).predict_sequential(x[None], n=200, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(one, batch)) and one[0].shape == (1,)


# ---------------------------------------------------------------------------------------------- noise view
def test_the_std_flag_explains_itself():
    import argparse
    parser = argparse.ArgumentParser()
    from smoothing.noise import add_std_flag
    add_std_flag(parser)
    (std,) = [a for a in parser._actions if a.dest == "std"]
    assert std.help.startswith("std σ of the Gaussian noise added to the scanner's input, in [0,1] pixel units")
    assert std.help.endswith("certify with the same sigma") and parser.parse_args([]).std == 0.5


def test_noise_view_adds_unclamped_gaussian_noise_from_the_global_generator():
    pair = torch.full((4, 3, 32, 32), 0.5)
    torch.manual_seed(0)
    (view,) = gaussian_noise_view(0.25)(pair, 0)
    assert view.name == "noisy" and view.weight == 1.0 and view.images.shape == pair.shape
    torch.manual_seed(0)
    assert torch.equal(view.images, pair + 0.25 * torch.randn_like(pair))  # σ·N(0, 1), the same draw: exact
    assert view.images.min() < 0 and view.images.max() > 1  # not clamped, as in certification
    assert gaussian_noise_view(0.25, weight=3.0)(pair, 0)[0].weight == 3.0
    _, args, views = train_rs.parse(["--run_name", "r", "--std", "0.25", "--rs_w", "3"])
    (view,) = views(pair, 0)  # train_rs.py: the noisy pair alone, at --rs_w, with σ = --std
    torch.manual_seed(1)
    (again,) = views(pair, 0)
    torch.manual_seed(1)
    assert view.weight == 3.0 and torch.equal(again.images, pair + 0.25 * torch.randn_like(pair))
    for std in (0, -1, float("inf")):
        with pytest.raises(ValueError, match="--std"):
            gaussian_noise_view(std)


# ---------------------------------------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def rs_run(tmp_path_factory, photo_folder):
    """A 3-step train_rs.py run at 32 px with σ = 0.25: results/rs/."""
    results = tmp_path_factory.mktemp("results")
    train_rs.main(["--run_name", "rs", "--results_dir", str(results), "--max_step", "3", "--std", "0.25",
                   "--train_path", str(photo_folder), *TINY])
    return results / "rs"


def test_train_rs_runs_a_few_steps_on_the_noisy_view(rs_run):
    checkpoint = torch.load(rs_run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 3
    assert (rs_run / "model" / "scanner.safetensors").is_file()
    assert json.loads((rs_run / "args.json").read_text())["std"] == 0.25
    tags = tensorboard_tags(rs_run / "tb")
    assert {"acc/noisy", "L_A/noisy"} <= tags and "acc/plain" not in tags


def test_train_rs_refuses_a_bad_std(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_rs.main(["--run_name", "x", "--results_dir", str(tmp_path), "--std", "0", *TINY])
    assert "--std" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny model folder, as save_pretrained writes it."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_pretrained(directory, StampEncoder(StampEncoderConfig(width=0.25)), Scanner(ScannerConfig("narrow")))
    return directory


def test_certify_cli_writes_cohens_tsv_and_refuses_to_overwrite(tmp_path, model_dir, photo_folder, capsys):
    out = tmp_path / "eval" / "certify.tsv"
    flags = ["--model", str(model_dir), "--data_path", str(photo_folder), "--max_images", "3", "--sigma", "0.25",
             "--size", "32", "--n0", "10", "--n", "50", "--batch_size", "16", "--device", "cpu", "--out", str(out)]
    certify_main(flags)
    printed = capsys.readouterr()
    lines = out.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert len(lines) == 7
    rows = read_tsv(out)
    assert [r.idx for r in rows] == list(range(6)) and [r.label for r in rows] == [0, 1] * 3
    assert all(r.predict in (ABSTAIN, 0, 1) and r.radius >= 0 and r.correct == (r.predict == r.label)
               for r in rows)
    assert not out.with_name(out.name + ".partial").exists()
    assert "| 0.25 |" in out.with_suffix(".md").read_text()
    assert "3 photos" in printed.out and "s per image" in printed.out and "| L2 radius |" in printed.out

    with pytest.raises(SystemExit) as exit_info:
        certify_main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and str(out) in err[0]
    certify_main(flags + ["--overwrite"])
    assert len(out.read_text().splitlines()) == 7


def test_certify_cli_takes_sigma_and_output_folder_from_a_train_rs_run(rs_run, photo_folder, capsys):
    certify_main(["--model", str(rs_run), "--data_path", str(photo_folder), "--max_images", "1", "--size", "0",
                  "--n0", "5", "--n", "20", "--device", "cpu"])
    assert len(read_tsv(rs_run / "eval" / "certify_sigma0.25.tsv")) == 2  # native size, σ from args.json


def test_certify_cli_errors_are_one_line(tmp_path, model_dir, capsys):
    no_photos = str(tmp_path / "no_photos_here")
    for flags, needle in ((["--model", str(model_dir)], "--sigma"),
                          (["--model", str(tmp_path / "nowhere"), "--sigma", "0.5"], "nowhere"),
                          (["--model", str(model_dir), "--sigma", "0.5", "--data_path", no_photos], "no_photos_here")):
        with pytest.raises(SystemExit) as exit_info:
            certify_main([*flags, "--device", "cpu", "--out", str(tmp_path / "c.tsv")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_certified_accuracy_table_and_tsv_round_trip(tmp_path):
    rows = [CertifyRow(0, 0, 0, 0.8, 1, 1.0), CertifyRow(1, 1, 1, 0.3, 1, 1.0),
            CertifyRow(2, 0, ABSTAIN, 0.0, 0, 1.0), CertifyRow(3, 1, 0, 2.5, 0, 1.0)]
    acc = certified_accuracy(rows)
    assert list(acc) == list(RADII)
    assert acc[0.0] == 0.5 and acc[0.25] == 0.5 and acc[0.5] == 0.25 and acc[1.0] == 0.0
    assert certified_accuracy(rows + [CertifyRow(4, 1, 1, 0.5, 1, 1.0)])[0.5] == 0.4  # a radius of r counts at r
    assert all(math.isnan(v) for v in certified_accuracy([]).values())
    table = format_table(rows)
    assert "| 0.50 | 25.0% | 50.0% | 0.0% |" in table and "| abstained | 25.0% | 50.0% | 0.0% |" in table
    assert write_tsv(iter(rows), tmp_path / "x.tsv") == rows
    assert read_tsv(tmp_path / "x.tsv") == rows
    # Cohen's own files write the time as a timedelta.
    cohen = tmp_path / "cohen.tsv"
    cohen.write_text("\t".join(TSV_COLUMNS) + "\n0\t1\t1\t0.512\t1\t0:00:01.500000\n")
    assert read_tsv(cohen) == [CertifyRow(0, 1, 1, 0.512, 1, 1.5)]
    cohen.write_text("idx\tlabel\n")
    with pytest.raises(ValueError, match="cohen.tsv"):
        read_tsv(cohen)
