"""Tests for the datasets package: image reading, file discovery, splitting,
the crop dataset and the scikit-image sample photos.

All images are generated here with Pillow/numpy; no image file is committed.
"""

from __future__ import annotations

import io
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from datasets import (IMAGE_EXTENSIONS, ImageFolderDataset, ImageReadError, NoImagesError,
                      SAMPLE_PHOTOS, Split, UnreadableImageWarning, find_images, load_rgb,
                      probe_image, resolve_image_paths, sample_photo_paths, split_files,
                      to_rgb, to_tensor)

RNG_SEED = 1234


def _noise(height: int, width: int, seed: int = RNG_SEED) -> np.ndarray:
    """Random uint8 RGB array (height, width, 3): every crop position differs."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _jpeg_bytes(height: int = 64, width: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(height, width)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """A folder with every kind of good and broken file the readers must handle.

    Readable (10): good.jpg, good.png, sub/nested.JPG, grey.png, palette.png,
    rgba.png, cmyk.jpg, gray16.png, rotated.jpg, and truncated.jpg (whose
    header is fine but whose pixel data is cut in half).
    Unreadable at the header (3): empty.jpg, text.jpg, tiny.png.
    Ignored by find_images: .hidden.png, .cache/x.png, notes.txt.
    """
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    (root / ".cache").mkdir()

    Image.fromarray(_noise(64, 96)).save(root / "good.jpg", quality=95)
    Image.fromarray(_noise(70, 100, seed=1)).save(root / "good.png")
    Image.fromarray(_noise(48, 48, seed=2)).save(root / "sub" / "nested.JPG", format="JPEG")
    Image.new("L", (40, 30), 77).save(root / "grey.png")

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putpixel((0, 0), 1)  # index 1 (blue) is the transparent one
    palette.save(root / "palette.png", transparency=1)

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255               # red everywhere, but ...
    rgba[0, 0, 3] = 0                # ... fully transparent here
    rgba[0, 1] = (0, 0, 255, 255)    # opaque blue
    rgba[1:, :, 3] = 255
    rgba[0, 2:, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")

    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # pure red

    gray16 = np.zeros((4, 4), dtype=np.uint16)
    gray16[0, 0], gray16[0, 1], gray16[0, 2] = 32768, 65535, 257
    Image.fromarray(gray16).save(root / "gray16.png")

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(_noise(40, 80, seed=3)).save(root / "rotated.jpg", exif=exif)

    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a JPEG\n")
    whole = _jpeg_bytes()
    (root / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    Image.new("RGB", (1, 1)).save(root / "tiny.png")

    Image.new("RGB", (8, 8)).save(root / ".hidden.png")
    Image.new("RGB", (8, 8)).save(root / ".cache" / "x.png")
    (root / "notes.txt").write_text("not an image")
    return root


GOOD = ["good.jpg", "good.png", "sub/nested.JPG", "grey.png", "palette.png", "rgba.png",
        "cmyk.jpg", "gray16.png", "rotated.jpg"]
HEADER_BROKEN = {"empty.jpg": "zero-byte file", "text.jpg": "not a recognised image format",
                 "tiny.png": "image is too small (1×1 px"}


def _good_paths(root: Path) -> list[Path]:
    return [root / name for name in GOOD]


def _dataset(*args, **kwargs) -> ImageFolderDataset:
    """Build a dataset, failing the test on any warning (none is expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ImageFolderDataset(*args, **kwargs)


# ---------------------------------------------------------------- load_rgb


@pytest.mark.parametrize("name", GOOD)
def test_load_rgb_gives_8bit_rgb_for_every_mode(photo_dir, name):
    img = load_rgb(photo_dir / name)
    assert img.mode == "RGB"
    tensor = to_tensor(img)
    assert tensor.dtype == torch.float32
    assert tensor.shape == (3, img.height, img.width)
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0


def test_load_rgb_grey_palette_cmyk_values(photo_dir):
    assert load_rgb(photo_dir / "grey.png").getpixel((0, 0)) == (77, 77, 77)
    palette = load_rgb(photo_dir / "palette.png")
    assert palette.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert palette.getpixel((1, 0)) == (255, 0, 0)
    red = np.asarray(load_rgb(photo_dir / "cmyk.jpg")).astype(int)[8, 8]
    assert red[0] > 230 and red[1] < 25 and red[2] < 25


def test_load_rgb_composites_alpha_on_white(photo_dir):
    img = load_rgb(photo_dir / "rgba.png")
    assert img.getpixel((0, 0)) == (255, 255, 255)  # not the hidden red
    assert img.getpixel((1, 0)) == (0, 0, 255)
    assert img.getpixel((3, 3)) == (255, 0, 0)


def test_load_rgb_rescales_16bit_instead_of_clipping(photo_dir):
    with Image.open(photo_dir / "gray16.png") as raw:
        assert raw.mode in ("I;16", "I")  # the file really is 16-bit
    img = load_rgb(photo_dir / "gray16.png")
    assert img.getpixel((0, 0)) == (128, 128, 128)  # 32768 -> 128, not 255
    assert img.getpixel((1, 0)) == (255, 255, 255)
    assert img.getpixel((2, 0)) == (1, 1, 1)
    assert img.getpixel((3, 0)) == (0, 0, 0)


def test_to_rgb_float_and_int32_modes():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert [to_rgb(unit).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert [to_rgb(wide).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_load_rgb_applies_exif_orientation(photo_dir):
    with Image.open(photo_dir / "rotated.jpg") as raw:
        assert raw.size == (80, 40)
    assert load_rgb(photo_dir / "rotated.jpg").size == (40, 80)
    assert probe_image(photo_dir / "rotated.jpg") == (40, 80)


@pytest.mark.parametrize("name, reason", [
    ("empty.jpg", "zero-byte file"),
    ("text.jpg", "not a recognised image format"),
    ("truncated.jpg", "truncated or corrupt image data"),
    ("tiny.png", "image is too small (1×1 px"),
    ("missing.jpg", "no such file"),
    ("sub", "is a directory"),
])
def test_load_rgb_errors_are_one_line_and_name_the_file(photo_dir, name, reason):
    path = photo_dir / name
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and reason in message
    assert "\n" not in message
    assert info.value.path == path and reason in info.value.reason


def test_truncation_is_missed_by_probe_but_caught_by_load(photo_dir):
    assert probe_image(photo_dir / "truncated.jpg") == (96, 64)
    with pytest.raises(ImageReadError, match="truncated"):
        load_rgb(photo_dir / "truncated.jpg")


def test_min_side_is_configurable(photo_dir):
    with pytest.raises(ImageReadError, match=r"too small \(48×48 px"):
        load_rgb(photo_dir / "sub" / "nested.JPG", min_side=49)
    assert load_rgb(photo_dir / "tiny.png", min_side=1).size == (1, 1)


# A 64x64 image has 4096 px: over twice 1000 (Pillow errors), between 3000 and
# twice 3000 (Pillow only warns). Both must be refused.
@pytest.mark.parametrize("limit", [1000, 3000])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, limit):
    target = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(target)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        # Ignored outside, so only the readers' own handling can turn Pillow's
        # warning (limit < pixels <= 2 * limit) into an error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for read in (load_rgb, probe_image):
            with pytest.raises(ImageReadError,
                               match=f"decompression-bomb limit of {limit} pixels"):
                read(target)


# ------------------------------------------------------------- find_images


def test_find_images_recursive_sorted_case_insensitive(photo_dir):
    found = find_images(photo_dir)
    names = sorted(str(p.relative_to(photo_dir)) for p in found)
    assert len(found) == 13
    assert found == sorted(found)
    assert "sub/nested.JPG" in names
    assert not any(name.startswith(".") or "/." in name for name in names)
    assert "notes.txt" not in names
    assert set(names) == set(GOOD) | set(HEADER_BROKEN) | {"truncated.jpg"}


def test_find_images_on_a_single_file(photo_dir):
    assert find_images(photo_dir / "good.png") == [photo_dir / "good.png"]
    with pytest.raises(NoImagesError, match="not an image file"):
        find_images(photo_dir / "notes.txt")


def test_find_images_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError,
                       match=f"^{re.escape(str(missing))}: no such file or directory$"):
        find_images(missing)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(NoImagesError,
                       match=rf"^{re.escape(str(tmp_path))}: no image files \(\.jpg, \.jpeg"):
        find_images(tmp_path)
    assert set(IMAGE_EXTENSIONS) >= {".jpg", ".png", ".tiff"}


# ------------------------------------------------------------------- split


def _fake_paths(n: int) -> list[Path]:
    return [Path(f"/data/img_{i:04d}.jpg") for i in range(n)]


def test_split_proportions_disjoint_and_complete():
    paths = _fake_paths(100)
    split = split_files(paths, seed=0)
    assert isinstance(split, Split)
    assert (len(split.train), len(split.val), len(split.test)) == (88, 2, 10)
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(paths)
    assert split.train == sorted(split.train)


def test_split_is_deterministic_and_seed_dependent():
    paths = _fake_paths(100)
    shuffled = list(paths)
    random.Random(7).shuffle(shuffled)
    assert split_files(paths, seed=3) == split_files(shuffled, seed=3)
    assert split_files([str(p) for p in paths], seed=3) == split_files(paths, seed=3)
    assert split_files(paths, seed=3).test != split_files(paths, seed=4).test


def test_split_small_sets():
    split = split_files(_fake_paths(3))
    assert (len(split.train), len(split.val), len(split.test)) == (1, 1, 1)
    split = split_files(_fake_paths(10))
    assert (len(split.train), len(split.val), len(split.test)) == (8, 1, 1)
    for n in (1, 2):
        with pytest.warns(UserWarning, match="not held out"):
            split = split_files(_fake_paths(n))
        assert split.train == split.val == split.test == _fake_paths(n)


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="no image paths"):
        split_files([])
    with pytest.raises(ValueError, match="test_frac"):
        split_files(_fake_paths(10), test_frac=1.0)
    # Duplicates must not end up on both sides of the split.
    split = split_files(_fake_paths(50) * 2)
    assert len(split.train) + len(split.val) + len(split.test) == 50


# ----------------------------------------------------------------- dataset


def test_dataset_skips_unreadable_files_with_one_warning(photo_dir):
    with pytest.warns(UnreadableImageWarning) as record:
        ds = ImageFolderDataset(photo_dir, 32, mode="center")
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("skipped 3 of 13 images that could not be read: ")
    for name, reason in HEADER_BROKEN.items():
        assert f"{name} ({reason}" in message
    reasons = {path.name: reason for path, reason in ds.skipped}
    assert reasons.keys() == HEADER_BROKEN.keys()
    assert all(expected in reasons[name] for name, expected in HEADER_BROKEN.items())
    assert len(ds) == len(ds.paths) == 10  # truncated.jpg passes the header check
    assert repr(ds) == ("ImageFolderDataset(mode='center', size=32, images=10, "
                        "skipped=3, cache=True)")


def test_dataset_warning_caps_the_names_listed(tmp_path):
    for i in range(12):
        (tmp_path / f"broken{i:02d}.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.warns(UnreadableImageWarning, match=r"skipped 12 of 13 .*, and 2 more$") as rec:
        ImageFolderDataset(tmp_path, 4, mode="center")
    assert "broken09.jpg" in str(rec[0].message) and "broken10.jpg" not in str(rec[0].message)


def test_dataset_without_usable_images(tmp_path):
    with pytest.raises(NoImagesError, match="no image files"):
        ImageFolderDataset(tmp_path, 32)
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("not a png")
    with pytest.raises(NoImagesError, match=r"none of the 2 image files could be read: "
                                            r"a\.jpg \(zero-byte file\), b\.png"):
        ImageFolderDataset(tmp_path, 32)
    with pytest.raises(NoImagesError, match="no image paths given"):
        ImageFolderDataset([], 32)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        ImageFolderDataset(tmp_path / "missing", 32)


@pytest.mark.parametrize("mode", ["random", "center", "grid"])
def test_dataset_square_modes_shape_dtype_range(photo_dir, mode):
    ds = _dataset(_good_paths(photo_dir), 32, mode=mode)
    assert len(ds) >= len(GOOD)
    for i in range(len(ds)):
        item = ds[i]
        assert item.shape == (3, 32, 32) and item.dtype == torch.float32
        assert 0.0 <= item.min() and item.max() <= 1.0
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_full_mode_returns_whole_images(photo_dir):
    ds = _dataset(_good_paths(photo_dir), None, mode="full")
    assert len(ds) == len(GOOD)
    for i, path in enumerate(ds.paths):
        item = ds[i]
        width, height = load_rgb(path).size
        assert item.shape == (3, height, width) and item.dtype == torch.float32
        assert 0.0 <= item.min() and item.max() <= 1.0
    rotated = ds[GOOD.index("rotated.jpg")]
    assert rotated.shape == (3, 80, 40)


@pytest.fixture
def grid_dir(tmp_path) -> Path:
    Image.fromarray(_noise(70, 100)).save(tmp_path / "a_wide.png")  # 2 x 3 tiles of 32
    Image.fromarray(_noise(50, 20, seed=5)).save(tmp_path / "b_small.png")  # < 32: 1 tile
    return tmp_path


def test_grid_tiles_count_and_positions(grid_dir):
    ds = _dataset(grid_dir, 32, mode="grid")
    assert len(ds) == 6 + 1
    pixels = np.asarray(Image.open(grid_dir / "a_wide.png"))
    # The 2x3 grid is centred: (70 - 64) // 2 = 3 rows and (100 - 96) // 2 = 2
    # columns of border are dropped on the top/left.
    expected = torch.from_numpy(pixels[3:35, 2:34].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(ds[0], expected)
    expected_last = torch.from_numpy(pixels[35:67, 66:98].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(ds[5], expected_last)
    assert ds[6].shape == (3, 32, 32)
    assert "items=7" in repr(ds)


def test_grid_max_tiles_per_image_spreads_tiles(grid_dir):
    full = _dataset(grid_dir, 32, mode="grid")
    capped = _dataset(grid_dir, 32, mode="grid", max_tiles_per_image=2)
    assert len(capped) == 2 + 1
    # Evenly spread: the centres of the two halves of the 6 tiles, i.e. 1 and 4.
    assert torch.equal(capped[0], full[1]) and torch.equal(capped[1], full[4])
    one = _dataset(grid_dir, 32, mode="grid", max_tiles_per_image=1)
    assert torch.equal(one[0], full[3])
    with pytest.raises(ValueError, match="only applies to mode='grid'"):
        ImageFolderDataset(grid_dir, 32, mode="center", max_tiles_per_image=2)


def test_center_and_grid_are_deterministic(grid_dir):
    for mode in ("center", "grid"):
        a = _dataset(grid_dir, 32, mode=mode, cache=False)
        b = _dataset(grid_dir, 32, mode=mode, cache=False)
        for i in range(len(a)):
            torch.manual_seed(i)  # the global RNG must not matter
            first = a[i]
            assert torch.equal(first, a[i]) and torch.equal(first, b[i])


def test_center_fit_crops_the_middle(grid_dir):
    ds = _dataset([grid_dir / "a_wide.png"], 70, mode="center")  # short side == size
    pixels = np.asarray(Image.open(grid_dir / "a_wide.png"))
    expected = torch.from_numpy(pixels[:, 15:85].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(ds[0], expected)
    small = _dataset([grid_dir / "a_wide.png"], 35, mode="center")[0]
    # Downscaled by 2 with antialiasing: close to the 2x2 block mean.
    blocks = expected.reshape(3, 35, 2, 35, 2).mean(dim=(2, 4))
    assert (small - blocks).abs().mean() < 0.1


def test_random_crops_vary_and_repeat_under_seed(grid_dir):
    ds = _dataset([grid_dir / "a_wide.png"], 16, mode="random")
    torch.manual_seed(0)
    first = [ds[0] for _ in range(5)]
    assert any(not torch.equal(first[0], other) for other in first[1:])
    torch.manual_seed(0)
    again = [ds[0] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    # The crop is a native-resolution window of the image.
    pixels = torch.from_numpy(np.asarray(Image.open(grid_dir / "a_wide.png")).copy())
    windows = pixels.permute(2, 0, 1).float().div(255).unfold(1, 16, 1).unfold(2, 16, 1)
    assert (windows == first[0][:, None, None]).flatten(3).all(-1).all(0).any()


def test_random_upscales_images_smaller_than_size(grid_dir):
    ds = _dataset([grid_dir / "b_small.png"], 32, mode="random")  # 20 x 50 px
    torch.manual_seed(0)
    crops = [ds[0] for _ in range(4)]
    assert all(c.shape == (3, 32, 32) and 0 <= c.min() and c.max() <= 1 for c in crops)
    assert any(not torch.equal(crops[0], c) for c in crops[1:])  # slides along the long side


def test_truncated_file_falls_back_to_next_image(photo_dir):
    good = photo_dir / "good.png"
    ds = _dataset([photo_dir / "truncated.jpg", good], 32, mode="center")
    assert len(ds) == 2 and ds.skipped == []
    with pytest.warns(UnreadableImageWarning, match=r"truncated\.jpg: truncated or corrupt"):
        item = ds[0]
    assert torch.equal(item, ds[1])
    assert [(p.name, r.split(" (")[0]) for p, r in ds.skipped] == [
        ("truncated.jpg", "truncated or corrupt image data")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the file is not retried
        assert torch.equal(ds[0], item)
    assert len(ds.skipped) == 1


def test_all_files_failing_to_decode_raises(photo_dir):
    ds = _dataset([photo_dir / "truncated.jpg"], 32, mode="random")
    with pytest.warns(UnreadableImageWarning):
        with pytest.raises(NoImagesError, match="could be decoded"):
            ds[0]


def test_cache_modes(grid_dir):
    auto = _dataset(grid_dir, 16, mode="center")
    assert auto.cache is True
    off = _dataset(grid_dir, 16, mode="center", cache=False)
    on = _dataset(grid_dir, 16, mode="center", cache=True)
    assert torch.equal(off[0], on[0]) and torch.equal(on[0], on[0])
    assert len(off._pixels_cache) == 0 and len(on._pixels_cache) == 1
    cached = on._pixels_cache[0].clone()
    on[0]
    assert torch.equal(on._pixels_cache[0], cached)  # crops never modify the cache


def test_dataloader_batches(grid_dir):
    ds = _dataset(grid_dir, 16, mode="grid")
    assert len(ds) == 4 * 6 + 3 * 1  # 70x100 px and 50x20 px in 16 px tiles
    batches = list(torch.utils.data.DataLoader(ds, batch_size=8))
    assert [b.shape for b in batches] == [(8, 3, 16, 16)] * 3 + [(3, 3, 16, 16)]


# The uint8 training loader (issue 38): uint8 items, converted to float on the device by to_unit_float.

@pytest.mark.parametrize("mode, kwargs", [("random", {}), ("random", {"max_crop_scale": 2.0}), ("center", {}),
                                          ("grid", {}), ("full", {})])
def test_uint8_items_equal_the_float_items_within_the_quantisation(grid_dir, mode, kwargs):
    """dtype=torch.uint8 gives the same crops as float32, as uint8: to_unit_float of a uint8 item equals the float
    item exactly where the crop is at native resolution (grid tiles, full images, random windows of the big photo)
    and within 0.5/255 where it was resized (bicubic on uint8, rounded: the small photo, centre fits, scale
    jitter)."""
    from datasets import to_unit_float
    size = None if mode == "full" else 32
    as_float = _dataset(grid_dir, size, mode=mode, **kwargs)
    as_uint8 = _dataset(grid_dir, size, mode=mode, dtype=torch.uint8, **kwargs)
    resized = exact = 0
    for i in range(len(as_float)):
        torch.manual_seed(i)  # the same random window in both
        reference = as_float[i]
        torch.manual_seed(i)
        item = as_uint8[i]
        assert item.dtype == torch.uint8 and item.shape == reference.shape and item.is_contiguous()
        converted = to_unit_float(item[None], "cpu")[0]
        assert converted.dtype == torch.float32
        assert (converted - reference).abs().max() <= 0.5 / 255 + 1e-6
        if torch.equal(converted, reference):
            exact += 1
        else:
            resized += 1
    # Native resolution converts bit for bit: full images, and grid tiles but for the 50x20 photo's centre fit.
    if mode == "full":
        assert resized == 0
    if mode == "grid":
        assert (exact, resized) == (6, 1)
    assert exact + resized == len(as_float)


def test_uint8_native_crops_are_exact_and_resized_ones_differ_only_by_rounding(grid_dir):
    """Tiles at native resolution convert to the float dataset's values bit for bit; a centre fit (resized) differs
    by rounding only: some pixels differ, none by more than 0.5/255, and the float path's value rounds to the
    uint8 one."""
    from datasets import to_unit_float
    tiles = _dataset([grid_dir / "a_wide.png"], 32, mode="grid")
    tiles8 = _dataset([grid_dir / "a_wide.png"], 32, mode="grid", dtype=torch.uint8)
    assert all(torch.equal(to_unit_float(tiles8[i][None], "cpu")[0], tiles[i]) for i in range(len(tiles)))
    fit = _dataset([grid_dir / "a_wide.png"], 35, mode="center")[0]
    fit8 = _dataset([grid_dir / "a_wide.png"], 35, mode="center", dtype=torch.uint8)[0]
    assert not torch.equal(to_unit_float(fit8[None], "cpu")[0], fit)  # it was resized, so it was rounded
    assert (fit8.int() - (fit * 255).round().int()).abs().max() <= 1  # a tie at .5 may round either way
    assert (to_unit_float(fit8[None], "cpu")[0] - fit).abs().max() <= 0.5 / 255 + 1e-6


def test_uint8_loader_batches_are_a_quarter_of_float32s_bytes_and_convert_on_the_device(grid_dir):
    """What a DataLoader over the uint8 dataset yields: (N,3,H,W) uint8, N·3·H·W bytes, a quarter of the float32
    batch; to_unit_float moves it to the device asked for and gives the float batch (exactly, for these tiles)."""
    from datasets import to_unit_float
    loader8 = torch.utils.data.DataLoader(_dataset(grid_dir, 16, mode="grid", dtype=torch.uint8), batch_size=8)
    loader32 = torch.utils.data.DataLoader(_dataset(grid_dir, 16, mode="grid"), batch_size=8)
    for batch8, batch32 in zip(loader8, loader32):
        assert batch8.dtype == torch.uint8 and batch8.shape[1:] == (3, 16, 16)
        nbytes = batch8.numel() * batch8.element_size()
        assert nbytes == batch8.shape[0] * 3 * 16 * 16 and 4 * nbytes == batch32.numel() * batch32.element_size()
        x = to_unit_float(batch8, torch.device("cpu"))
        assert x.dtype == torch.float32 and x.device.type == "cpu" and torch.equal(x, batch32)
        assert to_unit_float(batch8, "meta").device.type == "meta"  # converted where it is sent, not before
    # a batch of 64 at 400²: 30,720,000 bytes as uint8, a quarter of float32's 122,880,000
    assert torch.empty(64, 3, 400, 400, dtype=torch.uint8).nbytes * 4 == torch.empty(64, 3, 400, 400).nbytes
    with pytest.raises(TypeError, match="uint8"):
        to_unit_float(batch32, "cpu")
    with pytest.raises(ValueError, match="dtype must be"):
        ImageFolderDataset(grid_dir, 16, dtype=torch.float16)


def test_dataset_rejects_bad_arguments(grid_dir):
    with pytest.raises(ValueError, match="mode must be one of"):
        ImageFolderDataset(grid_dir, 32, mode="tiles")
    for size in (0, -3, 2.5, None, True):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            ImageFolderDataset(grid_dir, size)


# ----------------------------------------------------------------- samples


def test_sample_photos_exist_and_load_as_rgb():
    paths = sample_photo_paths()
    assert [p.name for p in paths] == list(SAMPLE_PHOTOS) and len(paths) == 15
    assert "motorcycle_right.png" not in SAMPLE_PHOTOS
    for path in paths:
        assert path.is_file()
        img = load_rgb(path)
        assert img.mode == "RGB" and min(img.size) >= 256


def test_sample_photos_clear_errors(monkeypatch):
    monkeypatch.setattr(datasets.samples, "SAMPLE_PHOTOS", ("astronaut.png", "nope.png"))
    with pytest.raises(FileNotFoundError, match="missing: nope.png"):
        sample_photo_paths()
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # makes the import fail
    with pytest.raises(ImportError, match="scikit-image is not installed"):
        sample_photo_paths()


def test_resolve_image_paths(photo_dir):
    lines = []
    paths = resolve_image_paths(None, log=lines.append)
    assert paths == sample_photo_paths()
    assert len(lines) == 2
    assert "--train_path/--data_path" in lines[0] and "15 scikit-image sample photos" in lines[0]
    assert lines[1] == ", ".join(SAMPLE_PHOTOS)
    lines.clear()
    assert resolve_image_paths(str(photo_dir), log=lines.append) == find_images(photo_dir)
    assert lines == []
    with pytest.raises(FileNotFoundError):
        resolve_image_paths(str(photo_dir / "missing"))
    with pytest.raises(ValueError, match="empty image path"):
        resolve_image_paths("")
