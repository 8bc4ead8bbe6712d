"""scan.py's checks: the calibration's settings against scan.py's, certificates that agree with the
verdict, and the largest radius CERTIFY can give. Tiny untrained models and stub scanners: CPU, no network."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import beta, norm
from torch import nn

import product.scanning
import scan
from conftest import cli, tiny_model_folders
from models import STAMPED, Scanner, ScannerConfig
from smoothing import ABSTAIN, Smooth, lower_confidence_bound
from smoothing.core import threshold_radius

SIGMA = 0.25


# ---------------------------------------------------------------- the calibration's settings against scan.py's
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny untrained model folders (smoothed at σ 0.25, and plain) and one 40×30 photo."""
    root = tmp_path_factory.mktemp("models")
    plain, smoothed = tiny_model_folders(root, SIGMA)
    photo = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(photo)
    return smoothed, plain, photo


def calibrate(folder, **keys):
    """Write folder/calibration.json in the schema of product.stage.calibration_record (the keys scan.py reads)."""
    smoothed = "n" in keys
    record = {"rule": scan.RULE, "score": scan.SMOOTHED_SCORE if smoothed else scan.PLAIN_SCORE,
              "judge": "smoothed" if smoothed else "plain", "sigma": SIGMA if smoothed else None, "target_fpr": 0.01,
              "threshold": 0.5 if smoothed else 0.0, "margin": 0.0 if smoothed else None, "n_clean": 10,
              "backed": False, "alpha": 0.001, "sequential": True if smoothed else None, "working_size": 512,
              "fitted_to": None, **keys}
    (folder / "calibration.json").write_text(json.dumps(record))
    return folder / "calibration.json"


def run_scan(folder, photo, capsys, *flags):
    """scan.py --json on one photo → (its record, the stderr lines that are notes)."""
    code, out, err = cli(scan, ["--model", folder, photo, "--json", "--batch_size", "20", "--device", "cpu",
                                *flags], capsys)
    assert code == 0, err
    return json.loads(out), [line for line in err.splitlines() if line.startswith("note:")]


def test_scan_at_its_defaults_judges_by_the_calibrations_own_settings(folders, capsys):
    """n, alpha, looks and margin come from the calibration: no note at scan.py's defaults."""
    smoothed, plain, photo = folders
    calibrate(smoothed, n=40, alpha=0.01, sequential=False, margin=1.5, working_size=64)
    record, notes = run_scan(smoothed, photo, capsys, "--working_size", "64")
    assert notes == [] and record["calibrated"] is True and "calibration_differs" not in record
    assert (record["n"], record["n_used"], record["margin"]) == (40, 40, 1.5)  # sequential off: all 40 copies
    calibrate(plain, threshold=2.5)
    record, notes = run_scan(plain, photo, capsys)  # --working_size defaults to 512, as the calibration's
    assert notes == [] and (record["calibrated"], record["threshold"]) == (True, 2.5)
    assert record["verdict"] == ("stamped" if record["score"] > 2.5 else "clean")


def test_settings_unlike_the_calibrations_are_named_in_one_line(folders, capsys):
    smoothed, _, photo = folders
    path = calibrate(smoothed, n=1000, working_size=64)
    record, notes = run_scan(smoothed, photo, capsys, "--n", "20", "--working_size", "32", "--alpha", "0.01")
    assert notes == [f"note: {path} was made with n 1000, alpha 0.001, at working size 64; scan.py judges with "
                     f"n 20, alpha 0.01, at working size 32: the calibrated false-positive rate may not hold"]
    assert record["calibrated"] is True and record["calibration_differs"] == ["n", "alpha", "working_size"]
    record, notes = run_scan(smoothed, photo, capsys, "--sequential", "off", "--n", "20", "--working_size", "64")
    assert record["calibration_differs"] == ["n", "sequential"] and len(notes) == 1


def test_a_calibration_made_under_another_rule_is_refused(folders, capsys):
    """A calibration written before rules were recorded (evaluate.py's detection stage: another rule, another n)
    or under another rule: scan.py refuses it in one line, and --threshold still scans."""
    smoothed, plain, photo = folders
    for folder in (smoothed, plain):
        for rule in (None, "scan.py rule 1"):
            path = calibrate(folder, rule=rule, **({"n": 20} if folder == smoothed else {}))
            code, out, err = cli(scan, ["--model", folder, photo, "--device", "cpu"], capsys)
            assert code == 2 and out == ""
            assert err.strip().splitlines() == [
                f"scan.py: error: {path}: made under another decision rule than scan.py's (its verdicts were "
                f"{rule or 'judged before rules were recorded'}), so its false-positive rate does not hold for "
                f"scan.py; recalibrate (evaluate.py --write_calibration) or pass --threshold"]
        record, _ = run_scan(folder, photo, capsys, "--threshold", "0.5", "--n", "20")
        assert record["threshold_source"] == "flag" and record["calibrated"] is False


def test_settings_of_an_unused_calibration_are_not_compared(folders, capsys):
    smoothed, _, photo = folders
    calibrate(smoothed, n=1000, working_size=64, sigma=0.5)  # another σ: not used at all
    record, notes = run_scan(smoothed, photo, capsys, "--n", "20", "--working_size", "32")
    assert record["calibrated"] is False and "calibration_differs" not in record
    assert len(notes) == 1 and "calibrates" in notes[0] and "uncalibrated" in notes[0]
    calibrate(smoothed, n=1000, working_size=64)  # --threshold wins: the calibration is not used
    record, notes = run_scan(smoothed, photo, capsys, "--n", "20", "--working_size", "32", "--threshold", "0.5")
    assert notes == [] and "calibration_differs" not in record


@pytest.mark.parametrize("made_score, made_sigma, sigma, used", [
    ("smoothed", SIGMA, SIGMA, True),
    ("smoothed", SIGMA, 0.5, False),  # another σ: its vote shares are another score
    ("smoothed", SIGMA, 0.26, False),
    ("smoothed", 0.5, SIGMA, False),
    ("smoothed", None, SIGMA, False),  # σ not recorded: cannot be trusted for this σ
    ("smoothed", SIGMA, None, False),  # a plain scan never uses a vote-share threshold
    ("plain", None, None, True),
    ("plain", None, SIGMA, False),  # a smoothed scan never uses a logit threshold
])
def test_a_calibration_is_used_only_for_its_own_score_and_sigma(tmp_path, made_score, made_sigma, sigma, used):
    score = scan.SMOOTHED_SCORE if made_score == "smoothed" else scan.PLAIN_SCORE
    (tmp_path / "calibration.json").write_text(json.dumps({"rule": scan.RULE, "score": score, "sigma": made_sigma,
                                                           "threshold": 0.73, "margin": 1.25, "target_fpr": 0.01,
                                                           "backed": True}))
    notes = []
    t = scan.resolve_rule(None, None, tmp_path, sigma, log=notes.append)
    if used:
        assert (t.value, t.source, t.calibrated, t.text, notes) == (0.73, "calibration", True, "calibrated, FPR ≤ 1%", [])
        assert t.margin == 1.25
    else:
        default = 0.5 if sigma is not None else 0.0
        assert (t.value, t.margin, t.source, t.calibrated) == (default, 0.0, "default", False)
        assert len(notes) == 1 and "calibration.json calibrates" in notes[0]
        assert notes[0].endswith(f"using the uncalibrated threshold {default:g}")


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "0"], "--threshold 0: a smoothed scanner's score is a share of votes, and only a threshold "
                           "strictly between 0 and 1 can be tested"),
    (["--threshold", "1"], "--threshold 1: a smoothed scanner's score"),
    (["--plain", "--margin", "1"], "--margin: applies to a smoothed scanner's base classifier only"),
])
def test_thresholds_no_test_can_decide_are_refused(folders, capsys, flags, message):
    smoothed, _, photo = folders
    code, out, err = cli(scan, ["--model", smoothed, photo, "--device", "cpu", *flags], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_the_margin_is_the_base_classifiers(folders, capsys):
    """A noisy copy votes stamped when the scanner's margin on it is above --margin: a margin below every copy's
    margin gives a unanimous stamped vote, one above every copy's a unanimous clean vote."""
    smoothed, _, photo = folders
    low, _ = run_scan(smoothed, photo, capsys, "--margin=-1e6", "--n", "64", "--seed", "1")
    high, _ = run_scan(smoothed, photo, capsys, "--margin", "1e6", "--n", "64", "--seed", "1")
    assert (low["verdict"], low["score"], high["verdict"], high["score"]) == ("stamped", 1.0, "clean", 0.0)
    assert low["threshold_source"] == "flag" and low["margin"] == -1e6


def test_the_noise_seed_comes_from_the_os_unless_given(folders, capsys):
    smoothed, _, photo = folders
    seeds = {run_scan(smoothed, photo, capsys, "--n", "20")[0]["seed"] for _ in range(3)}
    assert len(seeds) == 3  # 63 random bits each: equal draws would mean a fixed seed
    code, _, err = cli(scan, ["--model", smoothed, photo, "--n", "20", "--device", "cpu"], capsys)
    assert code == 0 and "noise seed " in err
    given = [run_scan(smoothed, photo, capsys, "--n", "20", "--seed", "7", "--sequential", "off")[0]
             for _ in range(2)]
    assert given[0]["seed"] == given[1]["seed"] == 7 and given[0]["votes"] == given[1]["votes"]


def test_the_scanners_scan_py_and_a_margin_scanner_agree_on_the_argmax():
    """MarginScanner shifts the stamped logit only: its argmax is "margin > m"."""
    from product.scanning import MarginScanner
    torch.manual_seed(0)
    scanner = Scanner(ScannerConfig("narrow")).eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        logits = scanner(x)
        margin = logits[:, STAMPED] - logits[:, 1 - STAMPED]
        m = float(margin.median())
        shifted = MarginScanner(scanner, m)(x)
    assert torch.equal(shifted.argmax(1) == STAMPED, margin > m)
    assert torch.equal(shifted[:, 1 - STAMPED], logits[:, 1 - STAMPED])


def test_the_fitted_square_of_a_fixed_input_scanner_is_compared():
    cal = {"fitted_to": 400, "working_size": None}
    assert scan.calibration_differences(cal, {}, ("fitted", 400)) == []
    assert scan.calibration_differences({"working_size": 512}, {}, ("fitted", 400)) == [
        ("working_size", "at working size 512", "on photos fitted to 400×400")]
    assert scan.calibration_differences(cal, {}, ("working", 512)) == [
        ("working_size", "on photos fitted to 400×400", "at working size 512")]


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_a_smoothed_verdict_abstains_unless_the_two_sided_test_against_the_threshold_rejects(t):
    """Every count of n = 60 votes: STAMPED/CLEAN by the side of t when scipy's two-sided binomtest of H0: p = t
    rejects at alpha, else ABSTAIN; at t = ½ exactly Smooth.decide (PREDICT). Some counts are significant one-sided
    only: a one-sided test would give them a verdict."""
    from scipy.stats import binomtest
    n, alpha, one_sided_only = 60, 0.01, 0
    for votes in range(n + 1):
        two = binomtest(votes, n, t).pvalue
        one = binomtest(votes, n, t, alternative="greater" if votes > t * n else "less").pvalue
        one_sided_only += one <= alpha < two
        expected = (STAMPED if votes > t * n else 1 - STAMPED) if two <= alpha else ABSTAIN
        assert scan.smoothed_verdict(votes, n, t, alpha) == expected, votes
        if t == 0.5:
            assert expected == Smooth.decide(torch.tensor([n - votes, votes]), alpha)
    assert one_sided_only >= 1


# ---------------------------------------------------------------- certificates agree with the verdict
class PixelScanner(nn.Module):
    """Reads "stamped" iff the top-left red value of its input exceeds CUT: on a flat grey image of value v under
    noise N(0, σ²) it votes stamped with probability P = 1 − Φ((CUT − v)/σ), known exactly."""

    CUT = 0.5
    input_size = None

    def forward(self, x):
        stamped = (x[:, 0, 0, 0] > self.CUT).float()
        return torch.stack([1 - stamped, stamped], dim=1)


def grey_value(p):
    """The 8-bit grey level closest to one where PixelScanner votes stamped with probability p."""
    return round(255 * (PixelScanner.CUT + SIGMA * norm.ppf(p)))


@pytest.fixture(scope="module")
def greys(tmp_path_factory):
    """Flat 16×16 grey photos whose vote shares straddle the thresholds 0.3, 0.5 and 0.9."""
    folder = tmp_path_factory.mktemp("greys")
    for p in (0.05, 0.2, 0.4, 0.6, 0.8, 0.97):
        Image.fromarray(np.full((16, 16, 3), grey_value(p), np.uint8)).save(folder / f"p{p}.png")
    return folder


def expected_radius(votes, n, t, stamped, alpha=0.001):
    """The radius computed with scipy directly: σ·(Φ⁻¹(p_lower) − Φ⁻¹(t)) for a stamped verdict,
    σ·(Φ⁻¹(q_lower) − Φ⁻¹(1 − t)) for a clean one (q = 1 − p), 0 when the bound does not clear."""
    k, level = (votes, t) if stamped else (n - votes, 1 - t)
    bound = float(beta.ppf(alpha, k, n - k + 1)) if k else 0.0
    return SIGMA * (float(norm.ppf(bound)) - float(norm.ppf(level))) if bound > level else 0.0


@pytest.mark.parametrize("t", [0.3, 0.5, 0.9])
def test_a_certificate_is_always_about_the_verdict(t, greys, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(product.scanning, "load_model", lambda path, device: (tmp_path, None, {}, None, PixelScanner(),
                                                                  {"sigma": SIGMA}))
    n = 400
    flags = ["--model", "M", greys, "--n", str(n), "--certify", "--threshold", str(t), "--device", "cpu",
             "--batch_size", "400", "--seed", "3"]
    code, out, _ = cli(scan, [*flags, "--json"], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 6
    certified = 0
    # the certificates' fresh copies, replayed: one generator seeded --seed + 1, carried from photo to photo in the
    # order scanned, n standard normals per pixel per photo; the stub reads the top-left red value
    generator = torch.Generator().manual_seed(3 + 1)
    for r in records:
        grey = torch.tensor(float(grey_value(float(r["path"].rsplit("/p", 1)[1][:-len(".png")])))) / 255
        if r["verdict"] == "abstain":
            assert (r["certified"], r["radius"]) == (False, 0.0)
            continue
        noise = torch.empty(n, 3, 16, 16).normal_(generator=generator)[:, 0, 0, 0]
        votes = r["certify_votes"]
        assert votes == int((noise * SIGMA + grey > PixelScanner.CUT).sum())  # the stub votes as designed, exactly
        stamped = r["verdict"] == "stamped"
        radius = expected_radius(votes, n, t, stamped)
        assert r["radius"] == radius  # exact: the same scipy calls in the same order
        assert r["radius"] == threshold_radius(votes, n, t, SIGMA, 0.001, above=stamped)
        if r["radius"] > 0:
            certified += 1
            assert r["certified"] == r["verdict"]
            assert f"the {r['verdict']} verdict" in r["certificate"]
            assert "holds for every L2 perturbation of norm <" in r["certificate"]
            # the brief's form for a clean verdict: σ·(Φ⁻¹(t) − Φ⁻¹(p_upper)), Clopper–Pearson upper bound
            if not stamped:
                upper = float(beta.ppf(1 - 0.001, votes + 1, n - votes)) if votes < n else 1.0
                assert r["radius"] == pytest.approx(SIGMA * (norm.ppf(t) - norm.ppf(upper)), rel=1e-9)
        else:
            assert (r["certified"], r["radius"]) == (False, 0.0) and "does not clear" in r["certificate"]
    assert certified >= 3  # stamped and clean verdicts far from t are certified at every threshold
    # the human-readable lines say the same
    code, out, _ = cli(scan, flags, capsys)
    for line in out.splitlines():
        verdict = line.split(": ", 1)[1].split(" ", 1)[0].lower()
        certificate = line.split("; certified: ", 1)[1]
        assert certificate.startswith(f"the {verdict} verdict") or certificate.startswith("false, radius 0")


def test_at_one_half_the_radius_is_cohens_for_the_same_counts():
    class Counted(Smooth):
        """Smooth whose selection and estimation counts are given."""

        def __init__(self, draws):
            super().__init__(PixelScanner(), SIGMA)
            self.draws = iter(draws)

        def _sample_counts(self, x, num, batch_size, generator=None):
            return next(self.draws)

    x = torch.zeros(3, 4, 4)
    n = 1000
    for votes in (0, 1, 300, 450, 480, 520, 550, 700, 999, 1000):
        for cls in (0, STAMPED):
            counts = torch.tensor([n - votes, votes])
            selection = torch.tensor([0, 10]) if cls == STAMPED else torch.tensor([10, 0])
            cohen_class, cohen_radius = Counted([selection, counts]).certify(x, n0=10, n=n, alpha=0.001)
            ours = threshold_radius(votes, n, 0.5, SIGMA, 0.001, above=cls == STAMPED)
            assert ours == cohen_radius, (votes, cls)  # exact
            assert (ours > 0) == (cohen_class == cls and cohen_radius > 0)


def test_threshold_radius_edges():
    assert threshold_radius(0, 100, 0.5, SIGMA, above=True) == 0.0
    assert threshold_radius(100, 100, 1.0, SIGMA, above=True) == 0.0  # "p > 1" never holds
    assert threshold_radius(100, 100, 1.0, SIGMA, above=False) == math.inf  # "p ≤ 1" always does
    assert threshold_radius(1, 100, 0.0, SIGMA, above=True) == math.inf  # p > 0 stays > 0 under smoothing
    assert threshold_radius(0, 100, 0.0, SIGMA, above=False) == 0.0
    # the decision "p > t" gets a smaller radius as t rises
    radii = [threshold_radius(900, 1000, t, SIGMA, above=True) for t in (0.3, 0.5, 0.7, 0.85)]
    assert radii == sorted(radii, reverse=True) and radii[-1] > 0
    assert threshold_radius(900, 1000, 0.9, SIGMA, above=True) == 0.0
    for bad, message in ((dict(votes=101), r"votes must be in \[0, n = 100\], got 101"),
                         (dict(threshold=1.5), r"threshold must be in \[0, 1\], got 1.5"),
                         (dict(sigma=0.0), r"sigma must be a finite noise standard deviation > 0, got 0.0"),
                         (dict(n=0), r"Smooth: n must be an integer ≥ 1, got 0")):
        with pytest.raises(ValueError, match=message):
            threshold_radius(**{"votes": 50, "n": 100, "threshold": 0.5, "sigma": SIGMA, **bad})
    # "p > t" unless said otherwise
    assert threshold_radius(900, 1000, 0.5, SIGMA) == threshold_radius(900, 1000, 0.5, SIGMA, above=True) > 0


# ---------------------------------------------------------------- the largest radius CERTIFY can give
def test_the_largest_radius_in_the_docstring_is_right():
    n, alpha = 100_000, 0.001
    p_a = float(beta.ppf(alpha, n, 1))
    assert p_a == pytest.approx(alpha ** (1 / n), rel=1e-12) and p_a == lower_confidence_bound(n, n, alpha)
    assert round(float(norm.ppf(p_a)), 2) == 3.81
    assert round(float(norm.ppf(beta.ppf(alpha, 10_000, 1))), 2) == 3.20
    assert round(float(norm.ppf(beta.ppf(alpha, 1_000, 1))), 2) == 2.46
    doc = " ".join(Smooth.certify.__doc__.split())
    assert "alpha = 0.001, pA = 0.99993092 and the largest radius is 3.81·σ" in doc
    assert "4.0" not in doc
    assert f"{p_a:.8f}" == "0.99993092"


def test_a_bound_that_does_not_clear_the_threshold_certifies_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(product.scanning, "load_model", lambda path, device: (tmp_path, None, {}, None, PixelScanner(),
                                                                  {"sigma": SIGMA}))
    args = scan.build_parser().parse_args(["--model", "M", "x.png", "--n", "400", "--certify", "--threshold",
                                           "0.9", "--device", "cpu"])
    scanner = scan.PhotoScanner(args, log=lambda *_: None)
    x = torch.zeros(3, 4, 4)
    for votes, certified in ((380, "stamped"), (365, False)):  # p_lower 0.907 > 0.9; 0.860 < 0.9
        monkeypatch.setattr(scanner.smooth, "counts", lambda *a, v=votes: torch.tensor([400 - v, v]))
        c = scanner.certify(x, STAMPED, 0.9)
        assert c["certified"] == certified and c["certify_votes"] == votes
        assert c["radius"] == expected_radius(votes, 400, 0.9, stamped=True) and (c["radius"] > 0) == bool(certified)
        record = {"path": "x.png", "verdict": "stamped", "score": 0.95, "threshold": 0.9, "votes": 380, "n": 400, **c}
        line = scanner.line(record)
        assert ("; certified: the stamped verdict (P(stamped) > 0.9) holds for every L2 perturbation of norm <" in line
                if certified else line.endswith(f"; certified: false, radius 0 (none: the lower confidence bound on "
                                                f"P(stamped) from {votes} of 400 fresh votes does not clear the "
                                                f"threshold 0.9 at alpha 0.001)"))
    # a clean verdict is certified on its own side, never as stamped
    monkeypatch.setattr(scanner.smooth, "counts", lambda *a: torch.tensor([100, 300]))
    c = scanner.certify(x, 1 - STAMPED, 0.9)
    assert c["certified"] == "clean" and c["radius"] == expected_radius(300, 400, 0.9, stamped=False) > 0
    assert scanner.certify(x, ABSTAIN, 0.9) == {"certified": False, "radius": 0.0, "certificate":
                                                     "none: the verdict abstains, so there is no verdict to certify"}
