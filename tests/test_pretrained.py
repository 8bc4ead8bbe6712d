"""The shipped models in pretrained_models/: complete folders with model cards, and stamp.py → scan.py with them
on the photos scikit-image ships, at the default working resolution (512 px)."""
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

import scan
import stamp
from report import shift_probe
from datasets.samples import sample_photo_paths
from models import load_pretrained
from models.io import CONFIG_NAME, ENCODER_NAME, SCANNER_NAME

from test_stamp_scan import cli

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained_models"
MODELS = ["baseline", "rs/sigma_0.25", "rs/sigma_0.5", "rs/sigma_0.75", "rs_aug"]
#: The models whose stamp does not survive stamp.py's working-resolution round trip on photos over 512 px
#: (issue 37 mends them): their tests on such photos are strict xfails. None today: rs/sigma_0.5 and rs/sigma_0.75
#: read them since their margins were calibrated by the product stage on all 14 pipelines (m −6.3 and −6.04: every
#: stamped photo of 50 caught as stamped at 2× and 4×).
ROUND_TRIP_LOST: set[str] = set()
ROUND_TRIP_REASON = (
    "the stamp does not survive stamp.py's working-resolution round trip (residual made at 512 px, upsampled to the "
    "photo, downscaled again by scan.py): on photos over 512 px stamped reads clean or abstains; with --working_size 0 "
    "for both all are caught; its card and docs/models.md")


#: Models that miss one of the sample photos after stamp.py's round trip, with why (strict xfails). None today:
#: rs/sigma_0.25 missed the stamped rocket.png (640 px) at its former margin 3.47 and reads it at −3.98, the margin
#: the product stage calibrated on all 14 pipelines.
SAMPLES_LOST: dict[str, str] = {}


def _models_losing_large_photos(more: dict | None = None):
    reasons = {**dict.fromkeys(ROUND_TRIP_LOST, ROUND_TRIP_REASON), **(more or {})}
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=reasons[name]))
            if name in reasons else name for name in MODELS]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four scikit-image photos (colour and grey, 451×300 to 1000×872) as PNG."""
    folder = tmp_path_factory.mktemp("in")
    for name in ("camera", "rocket", "chelsea", "hubble_deep_field"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def sample_photos(tmp_path_factory):
    """Every photo scikit-image ships that the project knows (datasets.samples: 15, colour and grey), as PNG."""
    folder = tmp_path_factory.mktemp("samples")
    for path in sample_photo_paths():
        with Image.open(path) as im:
            im.convert("RGB").save(folder / f"{path.stem}.png")
    return folder


def _forward_as_jpeg(src, dst, quality=75):
    """What a messaging app does: JPEG at `quality` with 4:2:0 chroma subsampling (Pillow's subsampling=2)."""
    dst.mkdir()
    for path in sorted(src.iterdir()):
        with Image.open(path) as im:
            im.save(dst / f"{path.stem}.jpg", quality=quality, subsampling=2)
    return dst


@pytest.mark.parametrize("name", MODELS)
def test_shipped_model_folder_is_complete_with_a_model_card(name):
    folder = SHIPPED / name
    needed = (ENCODER_NAME, SCANNER_NAME, CONFIG_NAME, "README.md", "calibration.json")
    for file in needed:
        assert (folder / file).is_file(), f"{folder / file} missing"
    encoder, scanner, config = load_pretrained(folder)
    assert scanner.config.arch == "fast"  # the CPU scanner, ≥ 300 images/s at 400×400 (see bench.py)
    card = (folder / "README.md").read_text()
    for needed in ("## Training", "python train", "wall time", "machine", "photos180", "## evaluate.py",
                   "python evaluate.py", "PSNR"):
        assert needed in card, f"{folder}/README.md lacks {needed!r}"
    assert (config.get("sigma") is not None) == name.startswith("rs")
    # every model: trained on photos180 + imagenet1000, calibrated on bsds400's 400 photos
    assert "imagenet1000" in card and "bsds400" in card
    calibration = json.loads((folder / "calibration.json").read_text())
    # backed: FPR ≤ 1% with 95% confidence, which needs ≥ 299 clean photos with none flagged
    assert calibration["backed"] is True and calibration["n_clean"] >= 299, calibration
    assert calibration["fpr_upper_bound"] <= calibration["target_fpr"] == 0.01
    assert not Path(calibration["evaluated"]).is_absolute() and "/work/" not in card and "/root/" not in card
    # made by the product stage under scan.py's rule, verified on clean photos after every platform pipeline
    assert calibration["rule"] == scan.RULE and calibration["false_positives"] == 0
    assert "as stamped" in calibration["chosen_on"]["pipelines"] and calibration["working_size"] == 512
    if config.get("sigma") is not None:  # the margin is calibrated; the vote threshold ½ keeps 16-copy verdicts
        assert calibration["threshold"] == 0.5 and calibration["n"] == 1000 and calibration["sequential"] is True


@pytest.mark.parametrize("name", MODELS)
def test_scan_py_at_its_defaults_judges_as_the_calibration_was_measured(name, photos, capsys):
    """No note at scan.py's defaults: n, alpha, looks, working size and margin are the calibration's."""
    code, out, err = cli(scan, ["--model", str(SHIPPED / name), str(photos / "camera.png"), "--json"], capsys)
    assert code == 0 and "note:" not in err and "calibrated, FPR ≤ 1%" in err
    assert json.loads(out)["calibrated"] is True and "calibration_differs" not in json.loads(out)


def _scan(model, inputs, capsys, *flags):
    code, out, _ = cli(scan, ["--model", str(model), *map(str, inputs), "--json", *flags], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    return code, {r["path"].rsplit("/", 1)[-1]: r for r in records}


#: How scan.py is asked to judge in the round-trip test: by each model's shipped calibration, and once by a threshold
#: given on the command line.
ROUND_TRIP = [("baseline", []), ("baseline", ["--threshold", "0"]), ("rs_aug", [])]


@pytest.mark.parametrize("name,judge", ROUND_TRIP)
def test_shipped_model_detects_its_stamp_and_passes_clean_photos(name, judge, photos, tmp_path, capsys):
    model = SHIPPED / name
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    code, out, _ = cli(stamp, ["--model", str(model), str(photos), "--out", str(tmp_path / "png")], capsys)
    assert code == 0 and sum(" -> " in line and "PSNR" in line for line in out.splitlines()) == len(before)
    cli(stamp, ["--model", str(model), str(photos), "--out", str(tmp_path / "jpg"), "--quality", "90"], capsys)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # inputs untouched

    _, clean = _scan(model, [photos], capsys, *judge)
    _, stamped = _scan(model, [tmp_path / "png"], capsys, *judge)
    _, jpeg = _scan(model, [tmp_path / "jpg"], capsys, *judge)
    assert [r["verdict"] for r in clean.values()] == ["clean"] * 4, clean
    assert [r["verdict"] for r in stamped.values()] == ["stamped"] * 4, stamped
    assert [r["verdict"] for r in jpeg.values()] == ["stamped"] * 4, jpeg  # JPEG at quality 90: still detected
    # the threshold is the shipped calibration's unless one is given
    assert all(r["calibrated"] == (not judge) for r in clean.values())


def test_shipped_model_round_trips_a_12_megapixel_photo(tmp_path, capsys):
    big = tmp_path / "big.jpg"
    Image.fromarray(skimage.data.rocket()).resize((4000, 3000), Image.BICUBIC).save(big, quality=95)
    model = SHIPPED / "baseline"
    code, out, _ = cli(stamp, ["--model", str(model), str(big), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    written = tmp_path / "out" / "big.png"
    with Image.open(written) as im:
        assert im.size == (4000, 3000)
        stamped = np.asarray(im.convert("RGB"), dtype=np.float64)
    with Image.open(big) as im:
        original = np.asarray(im.convert("RGB"), dtype=np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((stamped - original) ** 2))
    assert psnr > 30
    _, records = _scan(model, [written, big], capsys, *dict(ROUND_TRIP)["baseline"])
    assert records["big.png"]["verdict"] == "stamped" and records["big.jpg"]["verdict"] == "clean"


@pytest.mark.parametrize("name", _models_losing_large_photos())
def test_shipped_model_reads_its_stamp_on_a_photo_of_1500_px(name, tmp_path, capsys):
    """A photo larger than the working size: stamp.py makes the residual at 512 px and upsamples it, scan.py
    downscales the stamped file again; the stamp must survive that round trip, and the clean photo read clean."""
    photo = tmp_path / "in" / "chelsea_1500.png"
    photo.parent.mkdir()
    Image.fromarray(skimage.data.chelsea()).resize((1500, 998), Image.Resampling.LANCZOS).save(photo)
    model = SHIPPED / name
    assert cli(stamp, ["--model", str(model), str(photo), "--out", str(tmp_path / "out")], capsys)[0] == 0
    _, clean = _scan(model, [photo], capsys)
    _, stamped = _scan(model, [tmp_path / "out" / "chelsea_1500.png"], capsys)
    assert (clean["chelsea_1500.png"]["verdict"], stamped["chelsea_1500.png"]["verdict"]) == ("clean", "stamped")


def test_shipped_model_reports_broken_files_and_goes_on(photos, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "camera.png").write_bytes((photos / "camera.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    code, records = _scan(SHIPPED / "baseline", [folder], capsys)
    assert code == 1
    assert records["broken.jpg"]["verdict"] == "error" and records["broken.jpg"]["error"]
    assert records["camera.png"]["verdict"] == "clean"


@pytest.mark.parametrize("name", _models_losing_large_photos(SAMPLES_LOST))
def test_shipped_model_on_every_sample_photo_and_after_jpeg_75_420(name, sample_photos, tmp_path, capsys):
    """None of scikit-image's photos read as stamped, every stamped one is caught, also after JPEG q75 4:2:0."""
    model = SHIPPED / name
    code, _, _ = cli(stamp, ["--model", str(model), str(sample_photos), "--out", str(tmp_path / "png")], capsys)
    assert code == 0
    clean_jpeg = _forward_as_jpeg(sample_photos, tmp_path / "clean_jpg")
    stamped_jpeg = _forward_as_jpeg(tmp_path / "png", tmp_path / "stamped_jpg")
    names = sorted(p.stem for p in sample_photos.iterdir())
    assert len(names) == 15
    for folder, expected in [(sample_photos, "clean"), (tmp_path / "png", "stamped"), (clean_jpeg, "clean"),
                             (stamped_jpeg, "stamped")]:
        _, records = _scan(model, [folder], capsys)
        verdicts = {Path(path).stem: r["verdict"] for path, r in records.items()}
        assert verdicts == dict.fromkeys(names, expected), (folder.name, verdicts)


def test_shipped_baseline_reads_its_stamp_wherever_the_grid_moves(tmp_path, capsys):
    """The shipped baseline was trained with --grid_shift 16 (docs/models.md): its stamp is read at every shift of
    the pixel grid, including 6 rows down, where the earlier baseline, locked to the grid, lost it."""
    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(photo)
    grid = tmp_path / "grid.json"
    rows, columns = (0, 3, 6, 9, 16), (0, 3)
    argv = [SHIPPED / "baseline", photo, "--rows", ",".join(map(str, rows)), "--columns", ",".join(map(str, columns)),
            "--json", grid, "--device", "cpu"]
    code, out, err = cli(shift_probe, argv, capsys)
    assert code == 0, err
    stamped = json.loads(grid.read_text())["stamped"]
    assert stamped == {f"{row},{column}": 1 for row in rows for column in columns}
    assert "      6 1/1 1/1" in out and "10 of 10 shifts kept the stamp" in err
