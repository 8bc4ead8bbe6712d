"""Tests for datasets.prepare (python -m datasets.prepare) and the raw dataset layouts it serves.

Every image is made here, tiny; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets.prepare as prep
from datasets import ImageFolderDataset, find_images, resolve_image_paths
from datasets.prepare import (MANIFEST_NAME, TMP_SUFFIX, PrepareError, before_after, main, plan_jobs,
                              prepare_folder, sample_pairs)


def _smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB 'photo' (uint8, (H, W, 3)): compresses fast, resizes without aliasing."""
    low = np.random.default_rng(seed).uniform(0, 255, (height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC))


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file below root (hidden ones too): relative path -> (mtime_ns, sha1)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def mixed(tmp_path) -> Path:
    """JPEG, PNG, grey, RGBA, a rotated JPEG, a nested file, two broken files and non-image files.

    Readable (6): photo.jpg 120×80, plain.png 90×90, grey.png 40×30 (L), rgba.png 50×70 (fully
    transparent red: white once composited), rotated.jpg (stored 60×40, EXIF orientation 6: upright 40×60),
    sub/deep/nested.jpeg 64×48. Broken (2): truncated.jpg (half a JPEG), empty.png (zero bytes).
    Ignored: license.txt, meta/tags/tags1.txt, .hidden.png.
    """
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "meta" / "tags").mkdir(parents=True)
    Image.fromarray(_smooth(80, 120)).save(src / "photo.jpg", quality=90)
    Image.fromarray(_smooth(90, 90, 1)).save(src / "plain.png")
    Image.new("L", (40, 30), 90).save(src / "grey.png")
    Image.new("RGBA", (50, 70), (255, 0, 0, 0)).save(src / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(_smooth(40, 60, 2)).save(src / "rotated.jpg", exif=exif)
    Image.fromarray(_smooth(48, 64, 3)).save(src / "sub" / "deep" / "nested.jpeg")
    buffer = io.BytesIO()
    Image.fromarray(_smooth(64, 64, 4)).save(buffer, "JPEG")
    (src / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "license.txt").write_text("CC BY\n")
    (src / "meta" / "tags" / "tags1.txt").write_text("sky\n")
    Image.new("RGB", (8, 8)).save(src / ".hidden.png")
    return src


GOOD = ["grey.png", "photo.png", "plain.png", "rgba.png", "rotated.png", "sub/deep/nested.png"]


def test_mixed_folder_counts_sizes_modes_then_second_run_does_nothing(mixed, tmp_path):
    src_before = _tree(mixed)
    dst = tmp_path / "out"
    report = prepare_folder(mixed, dst, size=32, fit="crop", workers=2, progress=False)

    assert report.plan.found == 8
    assert sorted(str(j.dst.relative_to(dst)) for j in report.written) == GOOD
    reasons = {p.name: reason for p, reason in report.failed}
    assert set(reasons) == {"empty.png", "truncated.jpg"}
    assert reasons["empty.png"] == "zero-byte file" and "truncated" in reasons["truncated.jpg"]
    assert report.upscaled == 1  # grey.png: 30 px short side < 32
    outputs = sorted(str(p.relative_to(dst)) for p in find_images(dst))
    assert outputs == GOOD  # nothing else: no txt copied, no temporary file, manifest hidden
    for rel in GOOD:
        with Image.open(dst / rel) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32)), rel
    assert np.asarray(Image.open(dst / "rgba.png")).min() == 255  # transparency composited onto white
    grey = np.asarray(Image.open(dst / "grey.png"))
    assert (grey == 90).all()  # grey replicated to three equal channels
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    assert manifest["settings"] == {"size": 32, "fit": "crop", "format": "png"}
    assert manifest["ready"] == 6 and set(manifest["failed"]) == {"empty.png", "truncated.jpg"}
    assert "written now" in report.summary() and "truncated.jpg" in report.summary()

    images_after_first = {k: v for k, v in _tree(dst).items() if k != MANIFEST_NAME}
    again = prepare_folder(mixed, dst, size=32, fit="crop", workers=2, progress=False)
    assert again.written == [] and again.already_done == 6 and len(again.failed) == 2
    assert {k: v for k, v in _tree(dst).items() if k != MANIFEST_NAME} == images_after_first
    assert _tree(mixed) == src_before  # the source was never written to


def test_fit_modes_crop_pad_resize(tmp_path):
    # 300×100: red | green | blue thirds.
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100, 0] = pixels[:, 100:200, 1] = pixels[:, 200:, 2] = 255
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pixels).save(src / "bands.png")
    out = {}
    for fit in ("crop", "pad", "resize"):
        prepare_folder(src, tmp_path / fit, size=60, fit=fit, workers=1, progress=False)
        out[fit] = np.asarray(Image.open(tmp_path / fit / "bands.png")).astype(int)
        assert out[fit].shape == (60, 60, 3)
    # crop: short side 100 -> 60, centre square = the green band only.
    assert (out["crop"][:, 5:-5, 1] > 240).all() and (out["crop"][:, 5:-5, [0, 2]] < 15).all()
    # pad: 300×100 -> 60×20 in the middle, black above and below, all three bands kept.
    assert (out["pad"][:18] == 0).all() and (out["pad"][-18:] == 0).all()
    assert out["pad"][30, 5, 0] > 240 and out["pad"][30, 30, 1] > 240 and out["pad"][30, 55, 2] > 240
    # resize: the whole height kept, the bands squeezed into thirds of 60 px.
    assert out["resize"][:, 5, 0].min() > 240 and out["resize"][:, 55, 2].min() > 240


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    stored = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 tall as stored
    stored[:, :] = 200
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(src / "r.jpg", exif=exif, quality=95)
    prepare_folder(src, tmp_path / "out", size=60, fit="pad", workers=1, progress=False)
    out = np.asarray(Image.open(tmp_path / "out" / "r.png")).astype(int)
    # Upright it is 40×60 (portrait): padded left and right, not above and below.
    assert (out[:, :8] == 0).all() and (out[:, -8:] == 0).all() and out[:, 15:45].min() > 180


def test_format_policy(mixed, tmp_path):
    same = prepare_folder(mixed, tmp_path / "same", size=24, format="same", quality=80, workers=1,
                          progress=False)
    formats = {str(j.dst.relative_to(tmp_path / "same")): Image.open(j.dst).format for j in same.written}
    assert formats["photo.jpg"] == formats["sub/deep/nested.jpeg"] == "JPEG"
    assert formats["plain.png"] == formats["grey.png"] == "PNG"
    jpg = prepare_folder(mixed, tmp_path / "jpg", size=24, format="jpg", workers=1, progress=False)
    assert {j.dst.suffix for j in jpg.written} == {".jpg"}
    assert all(Image.open(j.dst).format == "JPEG" for j in jpg.written)


def test_failed_write_leaves_nothing_a_resumed_run_would_skip(mixed, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    real_replace = os.replace
    calls = []

    def replace_failing_once(a, b):
        if str(b).endswith("plain.png") and not calls:
            calls.append(b)
            raise OSError(28, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(prep.os, "replace", replace_failing_once)
    first = prepare_folder(mixed, dst, size=16, workers=1, progress=False)
    assert ("plain.png", "cannot write") in [(p.name, r[:12]) for p, r in first.failed]
    assert not (dst / "plain.png").exists()
    assert not [p for p in dst.rglob("*") if p.name.endswith(TMP_SUFFIX)]
    # A run killed mid-write leaves a hidden temporary file: the next run removes it, never counts it.
    (dst / f".photo.png.deadbeef{TMP_SUFFIX}").write_bytes(b"half a PNG")
    second = prepare_folder(mixed, dst, size=16, workers=1, progress=False)
    assert [j.src.name for j in second.written] == ["plain.png"]
    assert not [p for p in dst.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def test_output_name_conflicts_are_reported_not_overwritten(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(src / "a.jpg")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(src / "a.png")
    report = prepare_folder(src, tmp_path / "out", size=8, workers=1, progress=False)
    assert [j.src.name for j in report.written] == ["a.jpg"]
    assert len(report.failed) == 1 and report.failed[0][0].name == "a.png"
    assert "same output a.png" in report.failed[0][1]


@pytest.mark.parametrize("src_rel, dst_rel, message", [
    ("src", "src", "is --src or lies inside it"),
    ("src", "src/prepared", "is --src or lies inside it"),
    ("src", ".", "contains --src"),
    ("missing", "out", "--src {tmp}/missing: no such file or folder"),
    ("empty", "out", "--src {tmp}/empty: no image files"),
])
def test_refuses_bad_folders(mixed, tmp_path, src_rel, dst_rel, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match=re.escape(message.format(tmp=tmp_path))):
        plan_jobs(tmp_path / src_rel, tmp_path / dst_rel)


def test_refuses_foreign_folder_and_other_settings(mixed, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not empty and not made by datasets.prepare"):
        plan_jobs(mixed, foreign)
    prepare_folder(mixed, tmp_path / "out", size=16, workers=1, progress=False)
    with pytest.raises(PrepareError, match="prepared with --size 16 --fit crop --format png, not --size 20"):
        plan_jobs(mixed, tmp_path / "out", size=20)
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (20, 20)).save(other / "x.png")
    with pytest.raises(PrepareError, match="was prepared from --src"):
        plan_jobs(other, tmp_path / "out", size=16)


@pytest.mark.parametrize("flags, message", [
    (["--size", "0"], "--size must be a positive number of pixels, got 0"),
    (["--quality", "101"], "--quality must be an integer from 1 to 100"),
    (["--workers", "0"], "--workers must be ≥ 1"),
])
def test_cli_bad_values_are_one_line_errors(mixed, tmp_path, capsys, flags, message):
    assert main(["--src", str(mixed), "--dst", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_cli_runs_then_resumes(mixed, tmp_path, capsys):
    args = ["--src", str(mixed), "--dst", str(tmp_path / "out"), "--size", "20", "--workers", "2",
            "--no_progress"]
    assert main(args + ["--dry_run"]) == 0
    assert "8 images under" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 written now, 0 already done, 2 failed" in out and "empty.png: zero-byte file" in out
    assert main(args) == 0
    assert "0 written now, 6 already done, 2 failed" in capsys.readouterr().out


def test_before_after_sheet(mixed, tmp_path):
    report = prepare_folder(mixed, tmp_path / "out", size=32, workers=1, progress=False)
    pairs = sample_pairs(report.plan, 3)
    assert len(pairs) == 3 and all(after.is_file() for _, after in pairs)
    sheet = before_after(pairs, height=50)
    assert sheet.mode == "RGB" and sheet.height == 3 * 50 + 2 * 8
    assert 50 + 8 + 50 <= sheet.width


def test_raw_mirflickr_and_metfaces_layouts_are_readable(tmp_path):
    """train*.py --train_path / --data_path go through resolve_image_paths + ImageFolderDataset: the raw
    layouts' non-image files (MIRFlickr's meta/, licence, MetFaces' json) must be left out."""
    mir = tmp_path / "mirflickr"
    (mir / "meta" / "tags").mkdir(parents=True)
    (mir / "meta" / "license").mkdir(parents=True)
    for i in range(1, 4):
        Image.fromarray(_smooth(333, 500, i)).save(mir / f"im{i}.jpg", quality=85)
        (mir / "meta" / "tags" / f"tags{i}.txt").write_text("sky\nsea\n")
        (mir / "meta" / "license" / f"license{i}.txt").write_text("Attribution License\n")
    (mir / "license.txt").write_text("MIRFLICKR-25000 licence\n")
    met = tmp_path / "metfaces-dataset"
    (met / "images").mkdir(parents=True)
    (met / "metfaces.json").write_text("[]")
    for i in range(2):
        Image.fromarray(_smooth(64, 64, 10 + i)).save(met / "images" / f"1000{i}-00.png")

    paths = resolve_image_paths(mir)
    assert [p.name for p in paths] == ["im1.jpg", "im2.jpg", "im3.jpg"]
    dataset = ImageFolderDataset(paths, 32, mode="center")
    assert len(dataset) == 3 and dataset.skipped == [] and dataset[0].shape == (3, 32, 32)
    assert [p.name for p in resolve_image_paths(met / "images")] == ["10000-00.png", "10001-00.png"]

    # The prepared folder reads the same way: the manifest is hidden, nothing else is there.
    prepare_folder(mir, tmp_path / "mir400", size=40, workers=1, progress=False)
    prepared = ImageFolderDataset(resolve_image_paths(tmp_path / "mir400"), 40, mode="full")
    assert len(prepared) == 3 and prepared.sizes == [(40, 40)] * 3


def test_prepare_imports_without_torch():
    """The command, its worker processes and the notebook start in a fraction of a second: reading and
    writing images needs Pillow and numpy only (torch takes seconds to import)."""
    import subprocess
    import sys
    code = "import sys, datasets.prepare; print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
