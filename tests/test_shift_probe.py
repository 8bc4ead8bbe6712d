"""report.shift_probe: crops by (dy, dx) of a stamped photo, judged as scan.py judges a file."""
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conftest import cli
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
    for bad in ("a", "-1", "3-x"):
        with pytest.raises(Exception, match="shifts"):
            shift_probe.shift_list(bad)


def test_shipped_baseline_stamp_is_lost_when_the_grid_moves_a_few_rows(tmp_path, capsys):
    """The shipped baseline reads its stamp at shifts 0 and 16 rows (any column) but not at 6: the docs' finding."""
    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(photo)
    grid = tmp_path / "grid.json"
    argv = [BASELINE, photo, "--rows", "0,6,16", "--columns", "0,3", "--json", grid, "--device", "cpu"]
    code, out, err = cli(shift_probe, argv, capsys)
    assert code == 0, err
    stamped = json.loads(grid.read_text())["stamped"]
    assert stamped == {"0,0": 1, "0,3": 1, "6,0": 0, "6,3": 0, "16,0": 1, "16,3": 1}
    assert "      6 0/1 0/1" in out and "4 of 6 shifts kept the stamp" in err
    code, _, err = cli(shift_probe, argv, capsys)  # the grid is never overwritten
    assert code == 2 and "already exists" in err
