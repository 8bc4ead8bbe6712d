"""evaluate.py --quick on tiny checkpoints trained here, and the calibration it reports."""
import json
import math

import pytest
import torch
from scipy.stats import binomtest

import evaluate
import train
import train_rs
from report.calibration import clopper_pearson, operating_point
from report.conditions import table1_conditions
from report.detection import common_size
from conftest import TINY_TRAIN_FLAGS as TINY

EVAL = ["--quick", "--size", "32", "--device", "cpu", "--eps", "0,8,32", "--attack_images", "4",
        "--batch_size", "8"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, photo_folder):
    results = tmp_path_factory.mktemp("results")
    train.main(["--run_name", "plain", "--results_dir", str(results), "--max_step", "40", "--lr", "1e-3",
                "--ramp_steps", "20", "--train_path", str(photo_folder), *TINY])
    return results / "plain"


@pytest.fixture(scope="module")
def plain_eval(plain_run, photo_folder):
    return evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), "--all_images", *EVAL])


def test_every_table_is_produced_with_numbers_in_range(plain_eval, plain_run):
    out = plain_run / "eval" / "quick"
    for name in ("results.json", "tables.md", "table1.csv", "table2.csv", "table3.csv", "calibration.csv",
                 "roc.png", "attack_accuracy.png"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert set(plain_eval["table1"]) == set(table1_conditions())
    for row in plain_eval["table1"].values():
        assert all(0 <= row[k] <= 1 for k in ("acc_clean", "acc_stamped", "acc", "abstain", "auc"))
        assert row["n"] == 8 and row["abstain"] == 0  # a plain scanner never abstains
    t2 = plain_eval["table2"]
    assert 20 < t2["psnr"]["mean"] < 80 and 0 < t2["ssim"]["mean"] <= 1 and t2["psnr"]["n"] == 8
    assert t2["lpips"]["n"] == 0 and t2["lpips_note"].startswith("n/a")  # no AlexNet weights offline
    assert plain_eval["certification"] is None  # not a smoothed scanner
    assert plain_eval["settings"]["git_commit"] and plain_eval["settings"]["quick"] is True


def test_attacks_never_raise_accuracy_and_eps_zero_changes_nothing(plain_eval):
    t3 = plain_eval["table3"]
    assert set(t3["attacks"]) == {"apgd-ce", "square", "adaptive"}
    for attack, by_eps in t3["attacks"].items():
        rows = list(by_eps.values())
        assert [r["eps"] * 255 for r in rows] == pytest.approx([0, 8, 32])
        for key in ("acc_clean", "acc_stamped", "acc"):
            assert rows[0][key] == t3["no_attack"][key], (attack, key)  # ε = 0
            assert all(r[key] <= t3["no_attack"][key] for r in rows), (attack, key)
            assert rows[2][key] <= rows[1][key]  # a larger ball never helps the scanner
        assert 0 <= rows[2]["forgery_success"] <= 1 if rows[2]["forgery_success"] is not None else True
    # the strongest attack at 32/255 on an untrained-ish tiny scanner turns something
    assert t3["attacks"]["adaptive"]["32/255"]["acc"] < t3["no_attack"]["acc"] or t3["no_attack"]["acc"] == 0


def _md_table(markdown: str, heading: str) -> list[list[str]]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]


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


def test_an_earlier_evaluation_is_kept_unless_overwrite(plain_eval, plain_run, photo_folder, capsys):
    before = (plain_run / "eval" / "quick" / "results.json").read_text()
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), *EVAL])
    assert "--overwrite" in capsys.readouterr().err
    assert (plain_run / "eval" / "quick" / "results.json").read_text() == before


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


def test_the_runs_training_photos_are_not_used_by_default(plain_run, photo_folder, tmp_path, capsys):
    """Without --all_images, evaluating on the training folder uses its held-out test split only."""
    results = evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), "--out",
                             str(tmp_path), "--attack_images", "0", "--quick", "--size", "32", "--device", "cpu"])
    assert "held-out test split" in capsys.readouterr().out
    assert results["settings"]["photos"] == 1 and results["table3"] is None  # 12 photos → 1 test photo


def test_photos_of_different_sizes_at_native_resolution_are_attacked_at_a_common_size(plain_run, photo_folder,
                                                                                       tmp_path):
    """--size 0 judges every photo at its own size; attacks batch them centre-cropped to the smallest one."""
    results = evaluate.main(["--checkpoint", str(plain_run), "--data_path", str(photo_folder), "--all_images",
                             "--out", str(tmp_path), "--quick", "--size", "0", "--device", "cpu", "--eps", "8",
                             "--attack_images", "3", "--max_images", "3"])
    assert results["settings"]["photos"] == 12 and results["table3"]["images"] == 3
    parts = [torch.rand(1, 3, 41, 57), torch.rand(2, 3, 44, 59)]
    crops = common_size(parts)
    assert crops.shape == (3, 3, 41, 57)
    assert torch.equal(crops[0], parts[0][0]) and torch.equal(crops[1], parts[1][0, :, 1:42, 1:58])


def test_a_smoothed_scanner_is_judged_by_predict_and_certified(tmp_path, photo_folder):
    train_rs.main(["--run_name", "rs", "--results_dir", str(tmp_path), "--max_step", "6", "--std", "0.25",
                   "--train_path", str(photo_folder), *TINY])
    results = evaluate.main(["--checkpoint", str(tmp_path / "rs"), "--data_path", str(photo_folder),
                             "--all_images", *EVAL, "--max_images", "4", "--attack_images", "2", "--certify_images", "2"])
    assert results["settings"]["sigma"] == 0.25 and "PREDICT" in results["settings"]["judge"]
    assert set(results["table3"]["attacks"]) == {"apgd-ce", "square", "apgd-eot", "adaptive"}
    cert = results["certification"]
    assert cert["images"] == 2 and cert["n"] == 200
    radii = [float(r) for r in cert["all"]]
    accs = list(cert["all"].values())
    assert radii[0] == 0 and all(a >= b for a, b in zip(accs, accs[1:]))  # falls with the radius
    assert (tmp_path / "rs" / "eval" / "quick" / "certify_sigma0.25.tsv").is_file()
    assert (tmp_path / "rs" / "eval" / "quick" / "certified_accuracy.png").is_file()


# ------------------------------------------------------------------------------------------ calibration

def test_clopper_pearson_matches_scipys_exact_interval():
    for k, n in [(0, 30), (3, 30), (30, 30), (17, 1000)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high))


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
    assert small["threshold"] == clean[:30].max().item()
    assert math.isclose(small["fpr_upper_bound"], 1 - 0.05 ** (1 / 30), rel_tol=1e-6)
