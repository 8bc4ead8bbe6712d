"""Table 1b, forwarding: real codecs on the 8-bit photo (augment.forwarding), judged like Table 1 (evaluate.py)."""
import csv
import io
import json
from argparse import Namespace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import evaluate
from augment.forwarding import JPEG, CentreCrop, Downscale, Forwarding, WebP
from models import CLEAN, STAMPED, Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, save_pretrained
from report.conditions import forwarding_conditions, table1_conditions
from report.judge import Judge
from stamp import fit_pixels

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["JPEG q60 (4:2:0)", "JPEG q75 (4:2:0)", "WebP q75", "downscale to 75% (Lanczos), JPEG q80 (4:2:0)",
         "centre crop 90% of each side, JPEG q85 (4:2:0)"]


def _pixels(h=40, w=50, seed=0) -> np.ndarray:
    """A smooth random 'photo', (h,w,3) uint8."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (h // 6 + 2, w // 6 + 2, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC))


def _batch(*pixels) -> torch.Tensor:
    return torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1) for p in pixels]).float() / 255


def _pillow(pixels: np.ndarray, fmt: str, **options) -> tuple[np.ndarray, Image.Image]:
    """Pillow's own round trip, written out here: (decoded pixels, the opened file)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    return np.asarray(opened.convert("RGB")), opened


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    """(3,h,w) float k/255 → (h,w,3) uint8, checking that the values are exactly k/255."""
    k = (x * 255).round()
    assert torch.equal(k / 255, x)
    return k.to(torch.uint8).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------ the steps

@pytest.mark.parametrize("quality", [60, 75, 80, 85])
def test_jpeg_is_pillows_own_420_round_trip_bit_for_bit(quality):
    pixels = [_pixels(seed=0), _pixels(seed=1)]
    out = Forwarding(JPEG(quality))(_batch(*pixels))
    assert out.shape == (2, 3, 40, 50) and out.dtype == torch.float32
    for image, p in zip(out, pixels):
        expected, opened = _pillow(p, "JPEG", quality=quality, subsampling=2)
        assert JpegImagePlugin.get_sampling(opened) == 2  # the file Pillow writes with subsampling=2 is 4:2:0
        assert np.array_equal(_as_uint8(image), expected)
        full_chroma, _ = _pillow(p, "JPEG", quality=quality, subsampling=0)
        assert not np.array_equal(expected, full_chroma)  # the subsampling matters on these photos
        assert not np.array_equal(expected, p)  # really compressed


def test_webp_is_pillows_own_lossy_round_trip_and_changes_the_pixels():
    p = _pixels(seed=2)
    (image,) = Forwarding(WebP(75))(_batch(p))
    expected, opened = _pillow(p, "WEBP", quality=75)
    assert opened.format == "WEBP"
    assert np.array_equal(_as_uint8(image), expected)
    assert not np.array_equal(expected, p)


def test_downscale_gives_75_percent_of_each_side_with_lanczos_then_jpeg_q80():
    p = _pixels(40, 50, seed=3)
    (image,) = forwarding_conditions()[NAMES[3]](_batch(p))
    assert image.shape == (3, 30, 38)  # 0.75·40 = 30, 0.75·50 = 37.5 → 38
    small = np.asarray(Image.fromarray(p).resize((38, 30), Image.Resampling.LANCZOS))
    assert np.array_equal(Downscale(0.75)(p), small)
    expected, _ = _pillow(small, "JPEG", quality=80, subsampling=2)
    assert np.array_equal(_as_uint8(image), expected)


def test_centre_crop_keeps_the_central_90_percent_of_each_side_then_jpeg_q85():
    p = _pixels(40, 50, seed=4)
    assert np.array_equal(CentreCrop(0.9)(p), p[2:38, 2:47])  # 36×45: 2 rows and 2 or 3 columns cut per side
    (image,) = forwarding_conditions()[NAMES[4]](_batch(p))
    assert image.shape == (3, 36, 45)
    expected, _ = _pillow(np.ascontiguousarray(p[2:38, 2:47]), "JPEG", quality=85, subsampling=2)
    assert np.array_equal(_as_uint8(image), expected)


def test_a_stamped_photo_is_forwarded_from_its_8_bit_file():
    """A float stamped image (not a multiple of 1/255, some values outside [0,1] before the clamp) is forwarded
    exactly as the PNG a sender would save: round(255·clamp(x, 0, 1))."""
    g = torch.Generator().manual_seed(0)
    stamped = _batch(_pixels(seed=5)) + (torch.rand(1, 3, 40, 50, generator=g) - 0.5) * 0.03
    stamped[0, 0, 0, :3] = torch.tensor([-0.2, 1.3, 0.5 / 255])
    saved = (stamped.clamp(0, 1) * 255).round() / 255
    assert not torch.equal(saved, stamped)
    for name, condition in forwarding_conditions().items():
        assert torch.equal(condition(stamped), condition(saved)), name
    expected, _ = _pillow((saved[0] * 255).round().byte().permute(1, 2, 0).numpy(), "JPEG", quality=60,
                          subsampling=2)
    assert np.array_equal(_as_uint8(forwarding_conditions()[NAMES[0]](stamped)[0]), expected)


def test_prepare_fits_the_received_file_for_a_fixed_size_network():
    p = _pixels(40, 50, seed=6)
    condition = forwarding_conditions(partial(fit_pixels, size=16))[NAMES[3]]
    (image,) = condition(_batch(p))
    received = JPEG(80)(Downscale(0.75)(p))
    assert image.shape == (3, 16, 16) and np.array_equal(_as_uint8(image), fit_pixels(received, 16))


def test_table_1s_real_jpeg_q75_is_already_pillows_420_default():
    """Pillow's default chroma subsampling is 4:2:0, so Table 1's 'JPEG q75' and Table 1b's 'JPEG q75 (4:2:0)'
    are the same transformation (a plain judge gives both rows the same numbers)."""
    from augment import build
    x = _batch(_pixels(seed=8), _pixels(seed=9))
    assert torch.equal(build("jpeg", "eval", quality=(75, 75))(x), forwarding_conditions()[NAMES[1]](x))


def test_the_forwarding_names_are_their_own_and_in_order():
    assert list(forwarding_conditions()) == NAMES and not set(NAMES) & set(table1_conditions())
    with pytest.raises(ValueError, match="at least one step"):
        Forwarding()


# ------------------------------------------------------------------------------------------ evaluate.py

class SizeJudge(Judge):
    """The plain judge's interface, with a stub rule: a photo reads STAMPED iff its width is not TILE (it was
    downscaled or cropped), clean otherwise, whatever it holds. Records every batch it is given."""
    TILE = 32
    calls: list = []

    def __call__(self, x):
        SizeJudge.calls.append(x.clone())
        flagged = x.shape[-1] != self.TILE
        verdicts = torch.full((len(x),), STAMPED if flagged else CLEAN)
        return verdicts, torch.full((len(x),), 1.0 if flagged else -1.0)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """Three photos of 2×2 tiles of 32 px, and an untrained tiny model."""
    root = tmp_path_factory.mktemp("fwd")
    for i in range(3):
        Image.fromarray(_pixels(64, 64, seed=10 + i)).save(root / f"p{i}.png")
    torch.manual_seed(0)
    save_pretrained(root / "model", StampEncoder(StampEncoderConfig(width=0.25)), Scanner(ScannerConfig("narrow")))
    return root


def _evaluate(tiled, out, *flags):
    return evaluate.main(["--checkpoint", str(tiled / "model"), "--data_path", str(tiled), "--quick", "--size",
                          "32", "--max_images", "12", "--batch_size", "8", "--attack_images", "0", "--device",
                          "cpu", "--out", str(out), *flags])


@pytest.fixture(scope="module")
def stubbed(tiled, tmp_path_factory):
    """evaluate.py under both protocols with the SizeJudge; its calls in order."""
    out = tmp_path_factory.mktemp("stubbed")
    SizeJudge.calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "Judge", SizeJudge)
        results = _evaluate(tiled, out, "--protocol", "both")
    return out, results, SizeJudge.calls


def test_clean_and_stamped_photos_are_forwarded_and_judged_by_photo(stubbed):
    out, results, _ = stubbed
    rows = results["forwarding"]
    assert list(rows) == NAMES
    geometric = {NAMES[3], NAMES[4]}
    for name, row in rows.items():
        # the stub flags exactly the photos whose size changed: clean ones too (false positives)
        flagged = 1.0 if name in geometric else 0.0
        assert (row["acc_clean"], row["acc_stamped"], row["acc"]) == (1 - flagged, flagged, 0.5), name
        assert (row["n"], row["n_tiles"], row["abstain"]) == (3, 12, 0.0)
        original = results["original"]["forwarding"][name]
        assert (original["acc_clean"], original["acc_stamped"], original["n"]) == (1 - flagged, flagged, 3)
    assert set(results["table1"]) == set(table1_conditions())  # Table 1 itself is unchanged
    assert set(results["original"]["table1"]) == set(table1_conditions())
    assert list(results["settings"]["forwarding"]["conditions"]) == NAMES
    assert "tile" in results["settings"]["forwarding"]["judged"]
    assert json.loads((out / "results.json").read_text())["forwarding"] == rows


def test_the_judge_sees_the_forwarded_8_bit_photos(stubbed):
    """Per batch the judge gets Table 1's conditions then Table 1b's, each clean then stamped: the forwarded
    clean tile is the condition applied to the clean tile, the forwarded stamped one the condition applied to
    the stamped tile (itself judged under 'none'), which is the same as forwarding its 8-bit file."""
    _, _, calls = stubbed
    per_batch = 2 * (len(table1_conditions()) + len(NAMES))
    assert len(calls) == 2 * per_batch  # 12 tiles in batches of 8
    sizes = {NAMES[0]: 32, NAMES[1]: 32, NAMES[2]: 32, NAMES[3]: 24, NAMES[4]: 29}
    conditions = forwarding_conditions()
    for b in range(2):
        batch = calls[b * per_batch:(b + 1) * per_batch]
        clean, stamped = batch[0], batch[1]  # condition 'none'
        assert not torch.equal(clean, stamped)
        saved = (stamped.clamp(0, 1) * 255).round() / 255
        for i, name in enumerate(NAMES):
            seen_clean, seen_stamped = batch[2 * (len(table1_conditions()) + i):][:2]
            assert seen_clean.shape == seen_stamped.shape == (len(clean), 3, sizes[name], sizes[name])
            assert torch.equal(seen_clean, conditions[name](clean)), name
            assert torch.equal(seen_stamped, conditions[name](saved)), name


def test_tables_md_and_the_csvs_hold_the_forwarding_rows(stubbed):
    out, results, _ = stubbed
    md = (out / "tables.md").read_text()
    section = md.split("## Table 1b: forwarding", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]
    assert [r[0] for r in rows] == NAMES
    assert rows[3][1:4] + rows[3][6:7] == ["0.0", "100.0", "50.0", "3"]
    assert rows[0][1:4] + rows[0][6:7] == ["100.0", "0.0", "50.0", "3"]
    assert "LANCZOS" in section and "90% of each side" in section
    assert "paper overall %" not in section and "paper overall %" in md.split("## Table 1b", 1)[0]  # no paper table
    assert "### Table 1b: forwarding (original protocol)" in md
    with open(out / "forwarding.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["condition"] for r in table] == NAMES and [r["n"] for r in table] == ["3"] * 5
    assert "paper_acc_pct" not in table[0] and "abstain" in table[0]
    assert [float(r["acc_clean"]) for r in table] == [1.0, 1.0, 1.0, 0.0, 0.0]
    with open(out / "original_forwarding.csv") as f:
        assert [float(r["acc_stamped"]) for r in csv.DictReader(f)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_forwarding_off_skips_the_block(tiled, tmp_path):
    results = _evaluate(tiled, tmp_path / "ev", "--protocol", "strict", "--forwarding", "off")
    assert results["forwarding"] is None and results["settings"]["forwarding"] is None
    assert set(results["table1"]) == set(table1_conditions())
    assert "Table 1b" not in (tmp_path / "ev" / "tables.md").read_text()
    assert not (tmp_path / "ev" / "forwarding.csv").exists()


def test_a_fixed_size_network_is_given_the_received_file_fitted_again():
    ev = evaluate.Evaluation.__new__(evaluate.Evaluation)
    ev.args, ev.fit = Namespace(forwarding="on", size=400, working_size=None), 16
    conditions = ev._forwarding_conditions()
    p = _pixels(40, 50, seed=7)
    (image,) = conditions[NAMES[4]](_batch(p))
    assert np.array_equal(_as_uint8(image), fit_pixels(JPEG(85)(CentreCrop(0.9)(p)), 16))
    assert "fitted to 16×16" in ev.forwarding_settings["judged"]


def test_help_explains_the_flag():
    text = evaluate.build_parser().format_help()
    assert "--forwarding {on,off}" in text and "Table 1b" in text
