"""evaluate.py --quick on tiny checkpoints trained here, its tables recomputed from the model and the photos, and
the calibration it reports."""
import json
import math

import pytest
import torch
from scipy.stats import binomtest

import evaluate
import train
import train_rs
from datasets import ImageFolderDataset, resolve_image_paths
from models import load_pretrained
from report.attacks import AttackSettings
from report.calibration import auc, clopper_pearson, fpr_upper_bound, operating_point, roc_curve
from report.conditions import table1_conditions
from report.detection import common_size
from conftest import TINY_TRAIN_FLAGS as TINY

EVAL = ["--quick", "--size", "32", "--max_images", "8", "--device", "cpu", "--eps", "0,8,32", "--attack_images", "4",
        "--batch_size", "8"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, photo_folder):
    results = tmp_path_factory.mktemp("results")
    train.main(["--run_name", "plain", "--results_dir", str(results), "--max_step", "40", "--lr", "1e-3",
                "--ramp_steps", "20", "--train_path", str(photo_folder), *TINY])
    return results / "plain"


class _FakeLPIPS(torch.nn.Module):
    """A stand-in for LPIPS (tests never download its AlexNet): the mean absolute difference of each pair."""

    def forward(self, a, b, normalize=False):
        return (a - b).abs().mean((1, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def plain_eval(plain_run, photo_folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "load_lpips", lambda device, log=print: _FakeLPIPS())
        return evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), "--all_images",
                              *EVAL])


def _mann_whitney_auc(clean, stamped):
    """ROC-AUC counted pair by pair: the share of (clean, stamped) pairs scored in the right order, ties half."""
    pairs = [(c, s) for c in clean.tolist() for s in stamped.tolist()]
    return (sum(s > c for c, s in pairs) + 0.5 * sum(s == c for c, s in pairs)) / len(pairs)


@pytest.fixture(scope="module")
def recomputed(plain_run, photo_folder):
    """Table 1's "none" and "JPEG q90" rows and Table 2, recomputed here from the model and the photos: 8 tiles of
    32 px, the first of each of the first 8 photos (--max_images 8 of 12 photos, ceil(8/12) = 1 tile each), stamped as
    clamp(x + E(x), 0, 1) and judged by the plain scanner's argmax (score: logit(stamped) − logit(clean))."""
    encoder, scanner, _ = load_pretrained(plain_run / "model")
    dataset = ImageFolderDataset(resolve_image_paths(photo_folder), 32, mode="grid", max_tiles_per_image=1)
    x = torch.stack([dataset[i] for i in range(8)])
    rows = {}
    with torch.no_grad():
        stamped = (x + encoder(x)).clamp(0, 1)
        for name, condition in (("none", lambda v: v), ("JPEG q90", table1_conditions()["JPEG q90"])):
            (clean_logits, stamped_logits) = scanner(torch.cat([condition(x), condition(stamped)])).split(8)
            rows[name] = {"acc_clean": (clean_logits.argmax(1) == 0).double().mean().item(),
                          "acc_stamped": (stamped_logits.argmax(1) == 1).double().mean().item(),
                          "auc": _mann_whitney_auc(clean_logits[:, 1] - clean_logits[:, 0],
                                                   stamped_logits[:, 1] - stamped_logits[:, 0])}
    mse = (stamped - x).pow(2).mean((1, 2, 3)).double()
    return rows, {"psnr": -10 * torch.log10(mse), "lpips": (stamped - x).abs().mean((1, 2, 3)).double()}


@pytest.mark.end_to_end
def test_every_table_and_file_is_produced(plain_eval, plain_run):
    out = plain_run / "eval" / "quick"
    for name in ("results.json", "tables.md", "table1.csv", "table2.csv", "table3.csv", "calibration.csv",
                 "roc.png", "attack_accuracy.png"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert list(plain_eval["table1"]) == list(table1_conditions())
    assert plain_eval["certification"] is None  # not a smoothed scanner
    assert plain_eval["settings"]["git_commit"] and plain_eval["settings"]["quick"] is True


@pytest.mark.end_to_end
def test_table1_rows_are_the_scanners_verdicts_on_the_photos_under_each_condition(plain_eval, recomputed):
    rows, _ = recomputed
    for name, expected in rows.items():
        row = plain_eval["table1"][name]
        assert (row["n"], row["n_tiles"], row["abstain"]) == (8, 8, 0.0), name  # a plain scanner never abstains
        assert (row["acc_clean"], row["acc_stamped"]) == (expected["acc_clean"], expected["acc_stamped"]), name
        assert row["acc"] == (expected["acc_clean"] + expected["acc_stamped"]) / 2
        assert row["auc"] == pytest.approx(expected["auc"], abs=1e-12), name
    # not every condition reads like "none": the conditions reached the photos
    none = plain_eval["table1"]["none"]
    assert any(r["auc"] != none["auc"] for n, r in plain_eval["table1"].items() if n != "none")


@pytest.mark.end_to_end
def test_table2_is_the_mean_and_std_over_photos(plain_eval, recomputed):
    _, expected = recomputed
    t2 = plain_eval["table2"]
    for metric in ("psnr", "lpips"):
        values = expected[metric]
        assert t2[metric]["n"] == 8
        assert t2[metric]["mean"] == pytest.approx(values.mean().item(), rel=1e-5), metric
        assert t2[metric]["std"] == pytest.approx(values.std().item(), rel=1e-4), metric
    assert t2["ssim"]["n"] == 8 and t2["lpips_note"] is None


@pytest.mark.end_to_end
def test_attacks_never_raise_accuracy_and_their_rates_are_counted_over_the_right_photos(plain_eval):
    """4 clean and 4 stamped photos attacked. For a plain scanner (no abstention) every clean photo read clean
    without attack is either still read clean or forged, every stamped one read stamped is either still read
    stamped or removed: the rates follow from the counts exactly."""
    t3 = plain_eval["table3"]
    before = t3["no_attack"]
    assert (t3["images"], t3["n_clean"], t3["n_stamped"]) == (4, 4, 4) and before["abstain"] == 0
    assert set(t3["attacks"]) == {"apgd-ce", "square", "adaptive"}
    clean_right, stamped_right = round(4 * before["acc_clean"]), round(4 * before["acc_stamped"])
    assert clean_right + stamped_right > 0  # something to attack
    for attack, by_eps in t3["attacks"].items():
        rows = list(by_eps.values())
        assert [r["eps"] * 255 for r in rows] == pytest.approx([0, 8, 32])
        for key in ("acc_clean", "acc_stamped", "acc"):
            assert rows[0][key] == before[key], (attack, key)  # ε = 0
            assert rows[2][key] <= rows[1][key] <= before[key], (attack, key)  # a larger ball never helps
        for row in rows:
            assert row["acc_clean"] == (clean_right - row["n_forged"]) / 4, attack
            assert row["acc_stamped"] == (stamped_right - row["n_removed"]) / 4, attack
            assert row["forgery_success"] == (row["n_forged"] / clean_right if clean_right else None), attack
            assert row["removal_success"] == (row["n_removed"] / stamped_right if stamped_right else None), attack
        assert rows[0]["n_forged"] == rows[0]["n_removed"] == 0
    # at 32/255 the strongest attack turns some photo of this barely trained scanner
    assert t3["attacks"]["adaptive"]["32/255"]["acc"] < before["acc"]


def _md_table(markdown: str, heading: str) -> list[list[str]]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]


@pytest.mark.end_to_end
def test_json_csv_and_markdown_agree(plain_eval, plain_run):
    out = plain_run / "eval" / "quick"
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "tables.md").read_text()
    table1 = {row[0]: row for row in _md_table(markdown, "## Table 1")}
    assert set(table1) == set(results["table1"])
    for name, row in results["table1"].items():
        assert table1[name][1:4] == [f"{100 * row[k]:.1f}" for k in ("acc_clean", "acc_stamped", "acc")]
    (psnr_row, *_), t2 = _md_table(markdown, "## Table 2"), results["table2"]["psnr"]
    assert psnr_row[1] == f"{t2['mean']:.2f} ± {t2['std']:.2f}"
    table3 = _md_table(markdown, "## Table 3")
    assert len(table3) == 1 + 3 * 3  # no attack, then 3 attacks × 3 budgets
    adaptive32 = next(r for r in table3 if r[0] == "adaptive" and r[1] == "32/255")
    assert adaptive32[4] == f"{100 * results['table3']['attacks']['adaptive']['32/255']['acc']:.1f}"
    csv_lines = (out / "table1.csv").read_text().splitlines()
    assert csv_lines[0].startswith("condition,acc_clean") and len(csv_lines) == 1 + len(results["table1"])
    assert results["calibration"]["auc"] == pytest.approx(results["table1"]["none"]["auc"])
    # each photo's scores are kept: the operating points follow from them alone
    photo_scores = results["calibration"]["photo_scores"]
    assert len({p["photo"] for p in photo_scores}) == len(photo_scores) == results["table1"]["none"]["n"]
    clean, stamped = (torch.tensor([p[kind] for p in photo_scores]) for kind in ("clean", "stamped"))
    assert results["calibration"]["operating_points"][0] == operating_point(clean, stamped, 0.01)


@pytest.mark.end_to_end
def test_an_earlier_evaluation_is_kept_unless_overwrite(plain_eval, plain_run, photo_folder, capsys):
    before = (plain_run / "eval" / "quick" / "results.json").read_text()
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), *EVAL])
    assert "--overwrite" in capsys.readouterr().err
    assert (plain_run / "eval" / "quick" / "results.json").read_text() == before


@pytest.mark.end_to_end
@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "/no/such/run"], "no such folder"),
    (["--eps", "8,x"], "--eps"),
])
def test_bad_input_is_one_line(plain_run, tmp_path, capsys, flags, message):
    argv = ["--checkpoint", str(plain_run), "--out", str(tmp_path), "--quick", *flags]
    with pytest.raises(SystemExit):
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.end_to_end
def test_the_runs_training_photos_are_not_used_by_default(plain_run, photo_folder, tmp_path, capsys,
                                                          no_downloads):
    """Without --all_images, evaluating on the training folder uses its held-out test split only."""
    results = evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), "--out",
                             str(tmp_path), "--attack_images", "0", "--quick", "--size", "32", "--device", "cpu",
                             "--protocol", "strict"])
    captured = capsys.readouterr()
    assert "held-out test split" in captured.out
    assert results["settings"]["photos"] == 1 and results["table3"] is None  # 12 photos → 1 test photo
    assert "detection done" not in captured.err  # no long stage follows: figures printed once, at the end
    # without the AlexNet weights (tests never download them: conftest) Table 2 says why LPIPS is missing
    t2 = results["table2"]
    assert t2["lpips"]["n"] == 0 and t2["lpips_note"] == (
        f"n/a: torchvision could not load the AlexNet weights (<urlopen error tests never download "
        f"(https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)>). To enable it, put "
        f"alexnet-owt-7be5be79.pth in {no_downloads}/checkpoints/.")


@pytest.mark.end_to_end
def test_photos_of_different_sizes_at_native_resolution_are_attacked_at_a_common_size(plain_run, photo_folder,
                                                                                       tmp_path, capsys):
    """--size 0 judges every photo at its own size; attacks batch them centre-cropped to the smallest one.
    Detection's figures are printed before the attacks start, as the final summary prints them."""
    results = evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), "--all_images",
                             "--out", str(tmp_path), "--quick", "--size", "0", "--device", "cpu", "--eps", "8",
                             "--attack_images", "3", "--max_images", "3"])
    assert results["settings"]["photos"] == 12 and results["table3"]["images"] == 3
    captured = capsys.readouterr()
    block = captured.err.split("== detection done")[1]
    early = block[:block.index("\n", block.index("   PSNR"))].splitlines()[1:]  # up to the PSNR line
    assert early[0].startswith("   no corruption: clean") and len(early) >= 3
    assert all(line in captured.out.splitlines() for line in early)
    parts = [torch.rand(1, 3, 41, 57), torch.rand(2, 3, 44, 59)]
    crops = common_size(parts)
    assert crops.shape == (3, 3, 41, 57)
    assert torch.equal(crops[0], parts[0][0]) and torch.equal(crops[1], parts[1][0, :, 1:42, 1:58])


@pytest.mark.end_to_end
def test_a_smoothed_scanner_is_judged_by_predict_and_certified(tmp_path, photo_folder):
    train_rs.main(["--run_name", "rs", "--results_dir", str(tmp_path), "--max_step", "6", "--std", "0.25",
                   "--train_path", str(photo_folder), *TINY])
    results = evaluate.main(["--checkpoint", str(tmp_path / "rs"), "--data_path", str(photo_folder),
                             "--all_images", *EVAL, "--max_images", "4", "--attack_images", "2", "--certify_images", "2",
                             "--product", "on", "--working_size", "48"])
    assert results["settings"]["sigma"] == 0.25 and "PREDICT" in results["settings"]["judge"]
    # --product on: the product stage beside the paper's tables, judged by scan.py's smoothed rule at --quick's n
    product = results["product"]
    assert product["settings"]["judge"] == "smoothed" and product["settings"]["n"] == evaluate.QUICK["predict_n"]
    assert list(product["sizes"]) == ["1×"] and list(product["sizes"]["1×"]["rows"]) == list(evaluate.QUICK_PIPELINES)
    tables = (tmp_path / "rs" / "eval" / "quick" / "tables.md").read_text()
    assert "## Product stage: stamp.py → platform pipeline → scan.py" in tables
    assert set(results["table3"]["attacks"]) == {"apgd-ce", "square", "apgd-eot", "adaptive"}
    cert = results["certification"]
    assert cert["images"] == 2 and cert["n"] == evaluate.QUICK["certify_n"]
    radii = [float(r) for r in cert["all"]]
    accs = list(cert["all"].values())
    assert radii[0] == 0 and all(a >= b for a, b in zip(accs, accs[1:]))  # falls with the radius
    assert (tmp_path / "rs" / "eval" / "quick" / "certify_sigma0.25.tsv").is_file()
    assert (tmp_path / "rs" / "eval" / "quick" / "certified_accuracy.png").is_file()


def test_the_full_settings_are_the_papers():
    """Without --quick: CERTIFY with n0 = 100 and n = 100,000 at alpha 0.001 (Cohen's and the paper's), PREDICT
    with 1,000 copies, 100 photos attacked and certified, the original's 1,000 noisy passes, ε ∈ {2,4,8,16,32}/255
    (the original protocol's list adds 64), its PGD-40 with 40 steps, tiles of 400 px; the attacks' iterations are
    AttackSettings' defaults.
    The flags default to None, so that --quick can give its own values (QUICK) where a flag is not given."""
    assert evaluate.FULL == dict(max_images=None, size=400, predict_n=1000, certify_n=100_000, n0=100,
                                 certify_images=100, attack_images=100, passes=1000, eps="2,4,8,16,32",
                                 original_eps="2,4,8,16,32,64", pgd_steps=40)
    args = evaluate.build_parser().parse_args(["--checkpoint", "x"])
    assert all(getattr(args, key) is None for key in {**evaluate.FULL, **evaluate.QUICK})  # each a flag
    assert (args.alpha, args.seed) == (0.001, None)  # the seed is drawn, and recorded
    assert evaluate._eps_list(evaluate.FULL["eps"]) == tuple(e / 255 for e in (2, 4, 8, 16, 32))
    assert AttackSettings() == AttackSettings(apgd_iters=100, square_queries=5000, eot_iter=20)


class _WhiteStamp(torch.nn.Module):
    """An encoder whose stamp turns the photo white: no attack within ε ≤ 32/255 brings it back to a photo's."""

    input_size = None  # takes any size

    def forward(self, x):
        return 1 - x


class _CountingScanner(torch.nn.Module):
    """A scanner that reads a photo as stamped when its mean is above ¾ (a white stamp; these photos' means are
    about ½), so it is right on every photo, decisive under noise, and never fooled: every attack runs its full
    course on every photo, the most a quick evaluation can cost. It counts what it is handed: the images of each
    forward pass, with a gradient (attacks) or without, and their sides."""

    input_size = None  # takes any size

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(40.0))  # a parameter: where Smooth and the attacks find the device
        self.passes = {"without gradient": 0, "with gradient": 0}
        self.sides = set()

    def forward(self, x):
        self.passes["with gradient" if torch.is_grad_enabled() else "without gradient"] += len(x)
        self.sides.update(x.shape[-2:])
        margin = self.gain * (x.mean((1, 2, 3)) - 0.75)
        return torch.stack([-margin, margin], 1)


@pytest.mark.end_to_end
def test_quick_is_bounded_whatever_the_model(plain_run, photo_folder, tmp_path, monkeypatch):
    """--quick is a smoke check of every stage in at most 2 minutes whatever the model (a barely trained smoothed
    scanner, whose votes near ½ ran every verdict to n on 400-px tiles, once took over 20 minutes). Its cost, counted
    here in scanner passes on the costliest scanner (one that every attack runs its full course on): 64-px tiles, at
    most QUICK's predict_n copies per verdict (one look: votes near ½ cost no more), and at most 5,000 passes
    without a gradient and 150 with one, every stage run. The robust recipe's ResNet-18 at 64 px, costing that much,
    took 82 s on one CPU thread with three other processes on the 2 cores, 98 s with loading and writing."""
    scanner = _CountingScanner()
    real = evaluate.load_pretrained

    def load(*args, **kwargs):
        _, _, config = real(*args, **kwargs)
        return _WhiteStamp(), scanner, config

    monkeypatch.setattr(evaluate, "load_pretrained", load)
    monkeypatch.setattr(evaluate, "load_lpips", lambda device, log=print: _FakeLPIPS())
    results = evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), "--all_images",
                             "--quick", "--judge", "smoothed", "--sigma", "0.25", "--out", str(tmp_path), "--device",
                             "cpu"])
    quick, settings = evaluate.QUICK, results["settings"]
    assert settings["quick"] and (settings["images"], settings["size"]) == (quick["max_images"], quick["size"])
    assert (quick["max_images"], quick["size"]) == (4, 64)
    assert max(scanner.sides) == 64
    copies = settings["samples_per_verdict"]
    assert copies["verdicts"] == 4 * 2 * (len(table1_conditions()) + len(results["forwarding"]))
    assert max(int(n) for n in copies["distribution"]) == quick["predict_n"] == 16
    # every stage ran, on the settings QUICK gives it; no attack turned a photo
    t3, cert, original = results["table3"], results["certification"], results["original"]["table3"]
    assert (t3["images"], t3["no_attack"]["acc"], t3["attacks"]["adaptive"]["32/255"]["acc"]) == (1, 1.0, 1.0)
    assert (t3["settings"]["apgd_iters"], t3["settings"]["square_queries"], t3["settings"]["eot_iter"]) == (5, 20, 2)
    assert (cert["images"], cert["n0"], cert["n"]) == (2, 16, 100)
    assert (original["passes"], original["settings"]["pgd_steps"], len(original["eps"])) == (16, 5, 2)
    assert original["attacks"]["square"]["32/255"]["base_acc"] == 1.0
    assert scanner.passes["without gradient"] <= 5_000 and scanner.passes["with gradient"] <= 150, scanner.passes


# ------------------------------------------------------------------------------------------ calibration

def test_clopper_pearson_matches_scipys_exact_interval():
    for k, n in [(0, 30), (3, 30), (30, 30), (17, 1000), (0, 1), (1, 1)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high))
    assert clopper_pearson(0, 0) == (0.0, 1.0)  # no trials: every proportion is possible
    assert fpr_upper_bound(30, 30) == fpr_upper_bound(0, 0) == 1.0


def test_the_roc_and_auc_are_over_clean_scored_low_and_stamped_high():
    """Three clean and three stamped scores: 6 of the 9 (stamped, clean) pairs are ranked right."""
    clean, stamped = torch.tensor([0.1, 0.4, 0.9]), torch.tensor([0.35, 0.8, 0.95])
    roc = roc_curve(clean, stamped)
    assert roc["fpr"] == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    assert roc["tpr"] == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert roc["thresholds"][1:] == pytest.approx([0.95, 0.9, 0.8, 0.4, 0.35, 0.1])  # torchmetrics starts at 1
    assert roc["auc"] == pytest.approx(2 / 3) and auc(clean, stamped) == pytest.approx(2 / 3)
    assert set(roc) == {"fpr", "tpr", "thresholds", "auc"}
    logits = roc_curve(torch.tensor([-3.0, 0.5]), torch.tensor([-1.0, 2.0, 7.0]))  # on the logits' own scale
    assert logits["thresholds"][1:] == pytest.approx([7.0, 2.0, 0.5, -1.0, -3.0])
    assert logits["fpr"] == pytest.approx([0, 0, 0, 0.5, 0.5, 1])


@pytest.mark.parametrize("target_fpr, confidence", [(0.01, 0.95), (0.02, 0.9), (0.001, 0.95)])
def test_operating_point_sits_in_the_middle_of_the_gap_the_bound_allows(target_fpr, confidence):
    """Computed here from scipy alone: the most false positives k whose one-sided exact upper bound is within the
    target; the gap then runs from the (k+1)-th highest clean score to the next higher score of either kind, the
    threshold is its middle, and every field follows from it."""
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(2000, generator=gen).double()
    ranked = clean.sort(descending=True).values
    stamped = torch.cat([torch.randn(500, generator=gen).double() + 3, ranked[:40]])

    def bound(k):
        return binomtest(k, 2000, alternative="less").proportion_ci(confidence, method="exact").high

    k = max(k for k in range(0, 200) if bound(k) <= target_fpr) if bound(0) <= target_fpr else 0
    low = float(ranked[k])
    high = min(float(x) for x in torch.cat([clean, stamped]) if x > low)
    threshold = (low + high) / 2
    true_pos = int((stamped > threshold).sum())
    assert true_pos == int((stamped > low).sum())  # the same verdicts as at the bottom of the gap
    expected = {
        "target_fpr": target_fpr, "threshold": threshold, "gap": [low, high], "confidence": confidence,
        "fpr": k / 2000, "fpr_upper_bound": pytest.approx(bound(k), rel=1e-9), "tpr": true_pos / 540,
        "tpr_ci": pytest.approx(list(binomtest(true_pos, 540).proportion_ci(confidence, method="exact"))),
        "n_clean": 2000, "n_stamped": 540, "backed": bound(k) <= target_fpr,
        "clean_needed": math.ceil(math.log(1 - confidence) / math.log(1 - target_fpr)),
    }
    assert operating_point(clean, stamped, target_fpr, confidence) == expected
    assert k > 0 or target_fpr == 0.001  # 2,000 clean photos back 1% and 2% with false positives to spare


def test_operating_point_of_separated_votes_is_one_half():
    """A smoothed scanner whose clean photos drew no stamped vote and stamped photos only stamped votes: the
    threshold is ½ (PREDICT's majority), not 0, which would flag a photo on a single stamped vote; the gap up to
    the lowest stamped score when it is the next score, and no gap above the top score."""
    point = operating_point(torch.zeros(400), torch.ones(400), 0.01)
    assert point["threshold"] == 0.5 and point["gap"] == [0.0, 1.0] and point["backed"]
    assert point["fpr"] == 0 and point["tpr"] == 1
    near = operating_point(torch.zeros(400), torch.tensor([0.25, 1.0]), 0.01)
    assert near["threshold"] == 0.125 and near["tpr"] == 1
    nothing_above = operating_point(torch.linspace(0, 1, 400), torch.tensor([0.5]), 0.01)
    assert nothing_above["threshold"] == 1.0 and nothing_above["gap"] == [1.0, math.inf]
    assert nothing_above["tpr"] == 0


def test_operating_point_edges():
    """A bound equal to the target backs it; no clean photos back nothing; no stamped photos give no rate."""
    clean, stamped = torch.linspace(0, 1, 299), torch.tensor([2.0])
    exact = fpr_upper_bound(0, 299)
    assert operating_point(clean, stamped, exact)["backed"]
    assert not operating_point(clean, stamped, math.nextafter(exact, 0))["backed"]
    assert operating_point(clean, stamped, fpr_upper_bound(2, 299))["fpr"] == 2 / 299  # a bound at the target
    empty = operating_point(torch.empty(0), stamped, 0.01)
    assert empty["threshold"] == math.inf and math.isnan(empty["fpr"]) and not empty["backed"]
    assert empty["tpr"] == 0.0 and empty["fpr_upper_bound"] == 1.0
    anything = operating_point(clean, stamped, 0.9999)  # every clean photo but the lowest may be flagged
    assert anything["threshold"] == float(clean[1]) / 2 and anything["fpr"] == 298 / 299
    none_stamped = operating_point(clean, torch.empty(0), 0.01)
    assert math.isnan(none_stamped["tpr"]) and none_stamped["tpr_ci"] == [0.0, 1.0]


@pytest.mark.parametrize("false_pos, n_clean", [(0, 30), (0, 299), (3, 299), (10, 1000), (29, 30)])
def test_the_fpr_bound_is_the_one_sided_exact_upper_bound_at_95_percent(false_pos, n_clean):
    """scipy's exact one-sided interval, and the definition: P(Binomial(n, bound) ≤ k) = 5%."""
    from scipy.stats import binom
    bound = fpr_upper_bound(false_pos, n_clean)
    expected = binomtest(false_pos, n_clean, alternative="less").proportion_ci(0.95, method="exact").high
    assert bound == pytest.approx(expected, rel=1e-12)
    assert binom.cdf(false_pos, n_clean, bound) == pytest.approx(0.05, rel=1e-6)


def test_operating_point_holds_the_false_positive_rate_it_states():
    gen = torch.Generator().manual_seed(0)
    clean, stamped = torch.randn(3000, generator=gen), torch.randn(1000, generator=gen) + 3
    point = operating_point(clean, stamped, 0.01)
    assert point["backed"] and point["fpr_upper_bound"] <= 0.01
    assert point["fpr"] == (clean > point["threshold"]).double().mean().item() <= 0.01
    assert point["tpr"] == (stamped > point["threshold"]).double().mean().item()
    lower = operating_point(clean, stamped, 0.001)
    assert lower["threshold"] >= point["threshold"] and lower["tpr"] <= point["tpr"]
    # 30 clean photos cannot back "FPR ≤ 1%": the rule of three needs 299
    small = operating_point(clean[:30], stamped, 0.01)
    assert not small["backed"] and small["clean_needed"] == 299 and small["fpr"] == 0
    assert small["gap"][0] == clean[:30].max().item() < small["threshold"] < small["gap"][1]
    assert math.isclose(small["fpr_upper_bound"], 1 - 0.05 ** (1 / 30), rel_tol=1e-6)
