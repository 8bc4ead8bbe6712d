"""report.visibility: flat-block PSNR, the flattest window, the summary over photos, and the crops figure."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from report import visibility as vis
from report.visibility import BLOCK, CROP, GAP, STRIP


def gray(h, w, value=128):
    return np.full((h, w, 3), value, dtype=np.uint8)


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_luma_uses_the_bt601_weights():
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(vis.luma(pixels), [[0.299, 0.587, 0.114, 1.0]])


def test_block_std_is_the_luma_std_of_each_full_block_and_skips_partial_ones():
    pixels = gray(2 * BLOCK + 5, 3 * BLOCK + 7)  # partial blocks at the bottom and right are left out
    pixels[BLOCK:2 * BLOCK, 2 * BLOCK:3 * BLOCK] = noise(BLOCK, BLOCK)
    pixels[2 * BLOCK:, :] = noise(5, pixels.shape[1], seed=1)  # texture in the partial row must not count
    std = vis.block_std(pixels)
    assert std.shape == (2, 3)
    expected = np.zeros((2, 3))
    expected[1, 2] = vis.luma(pixels[BLOCK:, 2 * BLOCK:3 * BLOCK][:BLOCK]).std()
    np.testing.assert_allclose(std, expected, atol=1e-12)
    assert expected[1, 2] > 0.1


def test_flat_mask_flips_between_just_under_and_just_over_3_of_255():
    # A block of 0s with a share p of 7s has luma std 7·sqrt(p(1 − p))/255:
    # 62 sevens of 256 give 2.9988/255, 63 give 3.015/255.
    def block(sevens):
        values = np.zeros(BLOCK * BLOCK, dtype=np.uint8)
        values[:sevens] = 7
        return np.repeat(values.reshape(BLOCK, BLOCK, 1), 3, axis=2)
    assert vis.block_std(block(62))[0, 0] * 255 == pytest.approx(2.9988, abs=1e-3)
    assert vis.flat_mask(block(62)).tolist() == [[True]]
    assert vis.flat_mask(block(63)).tolist() == [[False]]


def test_psnr_matches_the_formula_by_hand_and_identical_images_give_inf():
    a = gray(BLOCK, 2 * BLOCK, value=0)
    b = a.copy()
    b[3, BLOCK + 4, 1] = 255  # 0 vs 255: a uint8 subtraction would wrap to 1
    b[5, BLOCK + 6, 2] = 10
    mse_all = (255 ** 2 + 10 ** 2) / (BLOCK * 2 * BLOCK * 3)
    assert vis.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / mse_all))
    mse_block = (255 ** 2 + 10 ** 2) / (BLOCK * BLOCK * 3)
    assert vis.psnr(a, b, np.array([[False, True]])) == pytest.approx(10 * math.log10(255 ** 2 / mse_block))
    assert vis.psnr(a, b, np.array([[True, False]])) == math.inf
    assert vis.psnr(a, b, np.array([[False, False]])) is None
    assert vis.psnr(a, a) == math.inf


def test_psnr_flat_sees_a_residual_on_the_flat_half_only_while_psnr_sees_both():
    clean = gray(2 * BLOCK, 4 * BLOCK)
    clean[:, 2 * BLOCK:] = noise(2 * BLOCK, 2 * BLOCK)  # right half textured
    on_texture = clean.copy()
    on_texture[:, 2 * BLOCK:] ^= 4  # ±4 on every textured pixel
    on_flat = clean.copy()
    on_flat[:, :2 * BLOCK] += 4

    textured = vis.photo_visibility(clean, on_texture)
    assert textured["psnr_flat"] == math.inf and textured["max_abs_flat"] == 0
    assert textured["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / (16 / 2)))
    assert (textured["flat_blocks"], textured["flat_fraction"]) == (4, 0.5)

    flat = vis.photo_visibility(clean, on_flat)
    assert flat["psnr_flat"] == pytest.approx(10 * math.log10(255 ** 2 / 16))  # all flat pixels off by 4
    assert flat["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 8))  # half of all pixels off by 4
    assert flat["max_abs_flat"] == 4

    no_flat = vis.photo_visibility(noise(BLOCK, BLOCK), noise(BLOCK, BLOCK, seed=1))
    assert (no_flat["psnr_flat"], no_flat["max_abs_flat"], no_flat["flat_blocks"]) == (None, None, 0)


def test_shape_mismatch_is_refused_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(16, 16, 3\) vs \(16, 32, 3\)"):
        vis.photo_visibility(gray(16, 16), gray(16, 32))
    with pytest.raises(ValueError, match=r"\(16, 16, 3\) vs \(32, 16, 3\)"):
        vis.psnr(gray(16, 16), gray(32, 16))


def test_flattest_window_finds_the_one_flat_patch_in_a_textured_photo():
    photo = noise(256, 320)
    photo[64:192, 112:240] = 90
    assert vis.flattest_window(photo) == (64, 112)
    assert vis.flattest_window(photo, size=32) == (64, 112)  # the first of the equally flat windows
    photo = noise(56, 200)  # the window shrinks to 56 px: only top 0 fits, and 3 blocks of it count
    photo[:, 144:] = 30
    top, left = vis.flattest_window(photo)
    assert (top, left) == (0, 144)
    assert vis.flattest_window(noise(10, 10)) == (0, 0)


RESULTS = [{"psnr": 40.0, "psnr_flat": 35.0, "flat_fraction": 0.5},
           {"psnr": math.inf, "psnr_flat": math.inf, "flat_fraction": 1.0},  # an identical photo
           {"psnr": 30.0, "psnr_flat": None, "flat_fraction": 0.0},
           {"psnr": 45.0, "psnr_flat": 32.0, "flat_fraction": 0.25}]
NAMES = ["a.png", "b.png", "c.png", "d.png"]


def test_summarize_caps_infinite_psnr_at_100_db_and_counts_only_photos_with_flat_blocks():
    summary = vis.summarize(RESULTS, NAMES)
    json.dumps(summary, allow_nan=False)  # no inf or NaN anywhere
    assert summary["photos"] == 4
    assert summary["psnr"]["mean"] == pytest.approx((40 + 100 + 30 + 45) / 4)
    assert summary["psnr"]["std"] == pytest.approx(np.std([40, 100, 30, 45]))
    flat = summary["psnr_flat"]
    assert flat["n"] == 3 and flat["mean"] == pytest.approx((35 + 100 + 32) / 3)
    assert flat["worst"] == {"name": "d.png", "value": 32.0}
    assert summary["flat_fraction_mean"] == pytest.approx(1.75 / 4)
    none_flat = vis.summarize([RESULTS[2]], ["c.png"])["psnr_flat"]
    assert none_flat == {"mean": None, "std": None, "n": 0, "worst": None}
    with pytest.raises(ValueError, match="one name per photo"):
        vis.summarize(RESULTS, NAMES[:3])


def test_worst_photos_are_the_lowest_flat_psnr_first_and_photos_without_flat_blocks_last():
    assert vis.worst_photos(RESULTS, NAMES) == [3, 0, 1, 2]
    assert vis.worst_photos(RESULTS, NAMES, k=2) == [3, 0]


def example(seed):
    clean = noise(160, 192, seed)
    clean[32:160, 48:176] = 100 + seed  # the flattest 128 px window is at (32, 48)
    rng = np.random.default_rng(seed + 10)
    stamped = np.clip(clean.astype(int) + rng.integers(-20, 21, clean.shape), 0, 255).astype(np.uint8)
    return f"photo{seed}.png", clean, stamped


@pytest.mark.parametrize("title", [None, "model X"])
def test_visibility_figure_shows_100_percent_crops_of_the_flattest_window(tmp_path, title):
    examples = [example(0), example(1)]
    path = vis.visibility_figure(examples, tmp_path / "fig" / "visibility.png", title=title)
    assert sorted(p.name for p in path.parent.iterdir()) == ["visibility.png"]  # no temporary file left
    with Image.open(path) as image:
        assert image.format == "PNG"
        canvas = np.asarray(image.convert("RGB"))
    headers = 2 if title else 1
    assert canvas.shape == (GAP + headers * STRIP + 2 * (STRIP + CROP + GAP), GAP + 3 * (CROP + GAP), 3)
    for row, (_, clean, stamped) in enumerate(examples):
        window = np.s_[32:32 + CROP, 48:48 + CROP]
        residual = np.clip(128 + 10 * (stamped[window].astype(int) - clean[window]), 0, 255)
        assert residual.min() == 0 and residual.max() == 255  # the test covers the clipping
        top = GAP + headers * STRIP + row * (STRIP + CROP + GAP) + STRIP
        for col, expected in enumerate([clean[window], stamped[window], residual]):
            left = GAP + col * (CROP + GAP)
            np.testing.assert_array_equal(canvas[top:top + CROP, left:left + CROP], expected)
        assert (canvas[top - STRIP:top] < 128).any()  # the label strip has text
