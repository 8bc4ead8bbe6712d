"""Statistics by photo (issue 15): tiles of one photo count once; CERTIFY's noise is independent of PREDICT's."""
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


def test_evaluate_counts_photos_and_records_tiles(tiled, tmp_path):
    results = evaluate.main(["--checkpoint", str(tiled / "model"), "--data_path", str(tiled), "--quick", "--size",
                             "32", "--max_images", "12", "--attack_images", "0", "--protocol", "strict",
                             "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert results["settings"]["images"] == 12
    for row in results["table1"].values():
        assert (row["n"], row["n_tiles"]) == (3, 12)
    cal = results["calibration"]
    assert cal["n_tiles"] == 12 and all(p["n_clean"] == 3 and p["n_stamped"] == 3 for p in cal["operating_points"])
    assert (results["table2"]["psnr"]["n"], results["table2"]["n_tiles"]) == (3, 12)
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["table1"]["none"]["n"] == 3


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
