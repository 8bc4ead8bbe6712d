"""report.shift_probe: crops by (dy, dx) of a stamped photo, judged with scan.py's settings."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli
from models import STAMPED
from report import shift_probe

BASELINE = Path(__file__).resolve().parents[1] / "pretrained_models" / "baseline"


def test_shifted_crops_are_the_slices_of_one_size_and_a_too_large_shift_is_refused():
    pixels = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
    crops = shift_probe.shifted_crops(pixels, [0, 2], [0, 1, 4])
    assert sorted(crops) == [(0, 0), (0, 1), (0, 4), (2, 0), (2, 1), (2, 4)]
    for (dy, dx), crop in crops.items():
        np.testing.assert_array_equal(crop, pixels[dy:dy + 5, dx:dx + 5])
    with pytest.raises(ValueError, match="leave nothing of a 9×7 photo"):
        shift_probe.shifted_crops(pixels, [0, 7], [0])


def test_shift_list_reads_ranges_and_lists_and_refuses_nonsense():
    assert shift_probe.shift_list("0-3,8,2") == [0, 1, 2, 3, 8]
    for bad, message in [("a", "shifts ≥ 0"), ("-1", "shifts ≥ 0"), ("3-x", "shifts ≥ 0"), ("0-2,5-3", "backwards")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            shift_probe.shift_list(bad)


def _rows_photo(path, height=40, width=30):
    """A grey photo whose every pixel holds its row index: a crop's first pixel says how far down it starts."""
    Image.fromarray(np.arange(height, dtype=np.uint8)[:, None, None].repeat(width, 1).repeat(3, 2)).save(path)
    return path


def test_probe_judges_every_shifted_crop_of_every_photo_and_counts_photos(tmp_path, capsys, monkeypatch):
    """With the stamp left out and a stand-in verdict (stamped iff the crop starts on an even row), the grid
    holds exactly the shifts asked for, counted over the photos."""
    photos = [_rows_photo(tmp_path / "a.png"), _rows_photo(tmp_path / "b.png", 50, 20)]
    monkeypatch.setattr(shift_probe, "stamp_pixels", lambda encoder, pixels, working_size: (pixels, pixels.shape[:2]))
    seen = []

    def judge(self, x):
        seen.append(tuple(x.shape))
        return (STAMPED if round(float(x[0, 0, 0, 0]) * 255) % 2 == 0 else 1 - STAMPED), 0.0, 1
    monkeypatch.setattr(shift_probe.PhotoScanner, "judge_tensor", judge)
    grid = tmp_path / "out" / "grid.json"
    argv = [BASELINE, *photos, "--rows", "0-3", "--columns", "0,2", "--json", grid, "--device", "cpu"]
    code, out, err = cli(shift_probe, argv, capsys)
    assert code == 0, err
    assert sorted(set(seen)) == [(1, 3, 37, 28), (1, 3, 47, 18)] and len(seen) == 2 * 8
    result = json.loads(grid.read_text(encoding="utf-8"))
    assert result["stamped"] == {f"{dy},{dx}": 2 * (dy % 2 == 0) for dy in range(4) for dx in (0, 2)}
    assert "      1 0/2 0/2" in out and "4 of 8 shifts kept the stamp on every photo, 4 lost it" in err
    code, _, err = cli(shift_probe, argv, capsys)  # the grid is never overwritten
    assert code == 2 and f"--json {grid}: already exists" in err


@pytest.mark.parametrize("make, flags, message", [
    (lambda p: _rows_photo(p / "small.png", 10, 10), ["--rows", "0-12"], "small.png: shifts up to 12 rows"),
    (lambda p: (p / "broken.png").write_bytes(b"not an image") and p / "broken.png", [], "broken.png"),
    (lambda p: _rows_photo(p / "a.png"), ["--json", "grid.txt"], "--json grid.txt: must be a .json file"),
])
def test_probe_refuses_bad_input_in_one_line_before_judging(make, flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shift_probe, "stamp_pixels", lambda *a, **k: pytest.fail("stamped before refusing"))
    photos = [_rows_photo(tmp_path / "first.png"), make(tmp_path)]
    code, _, err = cli(shift_probe, [BASELINE, *photos, *flags, "--device", "cpu"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) <= 2, err
