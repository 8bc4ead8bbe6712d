"""Statistics by photo: tiles of one photo count once; CERTIFY's noise is independent of PREDICT's."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from models import CLEAN, STAMPED, Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, save_pretrained
from report.calibration import operating_point
from report.detection import by_photo, photo_means


def test_a_photo_is_stamped_if_any_tile_is_and_scores_by_its_maximum():
    verdicts = torch.tensor([CLEAN, STAMPED, CLEAN, -1, CLEAN, CLEAN, CLEAN])
    scores = torch.tensor([-1.0, 2.0, -3.0, 0.1, -0.5, -0.2, -0.9])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    v, s = by_photo(verdicts, scores, ids)
    assert v.tolist() == [STAMPED, -1, CLEAN] and s.tolist() == pytest.approx([2.0, 0.1, -0.2])
    assert photo_means(scores, ids).tolist() == pytest.approx([0.5, -1.45, -0.5333333])
    assert s.dtype == photo_means(scores, ids).dtype == torch.float32  # the scores' own precision comes back


def test_five_photos_of_seventy_tiles_never_back_a_1_percent_fpr():
    """350 clean tiles with no false positive would 'back' FPR ≤ 1% (≥ 299 needed) if tiles were photos."""
    g = torch.Generator().manual_seed(0)
    clean_tiles, stamped_tiles = -1 - torch.rand(350, generator=g), 1 + torch.rand(350, generator=g)
    ids = torch.arange(5).repeat_interleave(70)
    assert operating_point(clean_tiles, stamped_tiles, 0.01)["backed"]  # the flaw, counted by tile
    _, clean = by_photo(torch.zeros(350, dtype=torch.long), clean_tiles, ids)
    _, stamped = by_photo(torch.ones(350, dtype=torch.long), stamped_tiles, ids)
    point = operating_point(clean, stamped, 0.01)
    assert point["n_clean"] == 5 and not point["backed"]


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """Three photos of 2×2 tiles of 32 px, and an untrained tiny model."""
    root = tmp_path_factory.mktemp("tiled")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    torch.manual_seed(0)
    save_pretrained(root / "model", StampEncoder(StampEncoderConfig(width=0.25)), Scanner(ScannerConfig("narrow")))
    return root


@pytest.mark.end_to_end
@pytest.mark.parametrize("max_images, photos", [(12, 3), (7, 3), (2, 2)])
def test_evaluate_counts_photos_and_records_tiles(tiled, tmp_path, max_images, photos):
    """--max_images M over P photos: ceil(M/P) tiles from each photo in turn, the first M of them, so 7 tiles are
    3 + 3 + 1 of the 3 photos, and 2 tiles come from 2 photos (one each)."""
    results = evaluate.main(["--checkpoint", str(tiled / "model"), "--data_path", str(tiled), "--quick", "--size",
                             "32", "--max_images", str(max_images), "--attack_images", "0", "--protocol", "strict",
                             "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert results["settings"]["images"] == max_images
    for row in results["table1"].values():
        assert (row["n"], row["n_tiles"]) == (photos, max_images)
    cal = results["calibration"]
    assert cal["n_tiles"] == max_images
    assert all(p["n_clean"] == photos and p["n_stamped"] == photos for p in cal["operating_points"])
    assert (results["table2"]["psnr"]["n"], results["table2"]["n_tiles"]) == (photos, max_images)
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["table1"]["none"]["n"] == photos


@pytest.mark.end_to_end
def test_certify_noise_is_independent_of_predict_noise(tiled, tmp_path, monkeypatch):
    seen = {}
    real = evaluate.certify_labelled

    def recording(smooth, items, *, generator, **kwargs):
        seen["seed"] = generator.initial_seed()
        return real(smooth, items, generator=generator, **kwargs)

    monkeypatch.setattr(evaluate, "certify_labelled", recording)
    evaluate.main(["--checkpoint", str(tiled / "model"), "--data_path", str(tiled), "--quick", "--size", "32",
                   "--max_images", "3", "--attack_images", "0", "--protocol", "strict", "--judge", "smoothed",
                   "--sigma", "0.25", "--predict_n", "8", "--certify_n", "8", "--n0", "4", "--certify_images", "1",
                   "--seed", "5", "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert seen["seed"] == evaluate.certify_seed(5) != 5  # PREDICT's generator is seeded with 5 itself
    predict = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    certify = torch.randn(1000, generator=torch.Generator().manual_seed(seen["seed"]))
    assert abs(float(torch.corrcoef(torch.stack([predict, certify]))[0, 1])) < 0.15  # no shared draws
    assert not torch.equal(predict[:10], certify[:10])


@pytest.mark.end_to_end
def test_attacks_and_certification_take_one_tile_per_photo(tiled, tmp_path, monkeypatch):
    """12 tiles of 3 photos: the photos attacked (and certified) are the first tile of each photo, clean and
    stamped, not the first tiles of the first photo."""
    from datasets import ImageFolderDataset, resolve_image_paths
    seen = {}
    real = evaluate.robustness_table

    def recording(scanner, clean, stamped, settings, sigma=None):
        seen["clean"] = clean.cpu()
        return real(scanner, clean, stamped, settings, sigma=sigma)

    monkeypatch.setattr(evaluate, "robustness_table", recording)
    evaluate.main(["--checkpoint", str(tiled / "model"), "--data_path", str(tiled), "--quick", "--size", "32",
                   "--max_images", "12", "--attack_images", "3", "--eps", "0", "--protocol", "strict",
                   "--forwarding", "off", "--device", "cpu", "--out", str(tmp_path / "ev")])
    tiles = ImageFolderDataset(resolve_image_paths(tiled), 32, mode="grid", max_tiles_per_image=4)
    assert torch.equal(seen["clean"], torch.stack([tiles[0], tiles[4], tiles[8]]))


# ------------------------------------------------------------------------------- the two protocols, side by side
def _evaluate(tiled, out, *flags):
    """evaluate.py --quick on the three tiled photos with tiny attacks; later flags override earlier ones."""
    return evaluate.main(["--checkpoint", str(tiled / "model"), "--data_path", str(tiled), "--quick", "--size", "32",
                          "--max_images", "6", "--device", "cpu", "--out", str(out), "--eps", "8",
                          "--original_eps", "8", "--attack_images", "2", "--apgd_iters", "2", "--square_queries",
                          "4", "--paper_row", "rs", *flags])


@pytest.fixture(scope="module")
def both(tiled, tmp_path_factory):
    out = tmp_path_factory.mktemp("both")
    return out, _evaluate(tiled, out, "--judge", "smoothed", "--sigma", "0.5", "--predict_n", "16", "--passes",
                          "16", "--certify_images", "0")


@pytest.mark.end_to_end
def test_both_protocols_are_written_with_the_paper_beside_them(both):
    out, results = both
    assert results["protocol"] == "both" and results["table3"] and results["original"]["table3"]
    original = results["original"]["table1"]["none"]
    strict = results["table1"]["none"]
    assert original["n"] == strict["n"] == 3 and 0 <= original["acc"] <= 1
    assert results["paper"]["kind"] == "rs" and results["paper"]["table3_row"] == "rs_0.5"
    assert results["paper"]["table3"]["apgd-ce"][2] == 71.22  # RS σ = 0.5, APGD-CE at 8/255
    md = (out / "tables.md").read_text()
    assert "## The original protocol" in md and "paper overall %" in md and "| apgd-ce | 8/255 |" in md
    assert "71.22" in md and "not MIRFlickr-25k" in md
    for name in ("original_table1.csv", "original_table2.csv", "original_table3.csv"):
        assert (out / name).is_file(), name
    assert "noise" in results["original"]["table3"]["attacks"] and "pgd-40" in results["original"]["table3"]["attacks"]


@pytest.mark.end_to_end
def test_original_table1_is_the_mean_vote_share_of_the_detection_pass(tiled, tmp_path, monkeypatch):
    captured = {}
    real = evaluate.Evaluation.detection

    def detection(self):
        real(self)
        captured["pass"], captured["ids"] = self.pass_, self.photo_ids

    monkeypatch.setattr(evaluate.Evaluation, "detection", detection)
    results = _evaluate(tiled, tmp_path / "ev", "--judge", "smoothed", "--sigma", "0.5", "--predict_n", "16",
                        "--attack_images", "0", "--certify_images", "0", "--protocol", "original")
    (sc, ss) = captured["pass"]["scores"]["none"]
    clean = photo_means(1 - sc.double(), captured["ids"]).mean().item()
    stamped = photo_means(ss.double(), captured["ids"]).mean().item()
    row = results["original"]["table1"]["none"]
    assert row["acc_clean"] == pytest.approx(clean) and row["acc_stamped"] == pytest.approx(stamped)
    assert results["table3"] is None and results["certification"] is None  # strict stages skipped


@pytest.mark.end_to_end
def test_strict_protocol_writes_no_original_section(tiled, tmp_path):
    results = _evaluate(tiled, tmp_path / "ev", "--protocol", "strict", "--attack_images", "0")
    assert results["original"] is None
    assert "## The original protocol" not in (tmp_path / "ev" / "tables.md").read_text()


@pytest.mark.end_to_end
def test_compare_assembles_the_papers_tables(both, tiled, tmp_path, capsys):
    out, _ = both
    plain = _evaluate(tiled, tmp_path / "plain", "--paper_row", "plain", "--protocol", "both")
    assert plain["paper"]["kind"] == "plain"
    evaluate.main(["--compare", str(out / "results.json"), str(tmp_path / "plain"), "--out", str(tmp_path / "c.md")])
    md = (tmp_path / "c.md").read_text()
    data = json.loads((tmp_path / "c.json").read_text())
    assert "## Table 1" in md and "## Table 3" in md and "71.22" in md
    assert {row["paper_row"] for row in data["table3"]} == {"rs_0.5", "plain"}
    assert len(data["table3"]) == 2 * 3 * 5  # two models × three attacks × five budgets
    assert [row["paper_pct"] for row in data["table1"] if row["paper_row"] == "Plain"] == [100.0]
    with pytest.raises(SystemExit):
        evaluate.main(["--compare", str(tmp_path / "nowhere")])
    assert "no results.json found" in capsys.readouterr().err
