"""The product stage (product.stage): platform pipelines on real files, verdicts that are scan.py's own, photo sizes,
visibility, and the calibration made under scan.py's rule. Tiny untrained models and small photos: CPU, seconds."""
import json

import numpy as np
import pytest
from PIL import Image

import scan
import stamp
from augment.forwarding import JPEG, PNG, CropAspect, LongSide, Resample
from conftest import cli, tiny_model_folders
from product import pipelines
from product.files import read_pixels
from product.scanning import RULE, PhotoScanner, ScanSettings
from product.stage import ProductStage, StageSettings, calibration_record, rate, render, rescale

pytestmark = pytest.mark.usefixtures("one_thread")
SIGMA = 0.25


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny untrained plain model folder and a smoothed one (σ 0.25)."""
    return tiny_model_folders(tmp_path_factory.mktemp("models"), SIGMA)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five smooth 'photos' of 48×36 px (JPEG files, as people send)."""
    folder = tmp_path_factory.mktemp("product_photos")
    rng = np.random.default_rng(1)
    for i in range(5):
        low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        Image.fromarray(low).resize((48, 36), Image.BICUBIC).save(folder / f"p{i}.jpg", quality=95)
    return sorted(folder.glob("*.jpg"))


# ------------------------------------------------------------------ pipelines
def test_platform_steps_keep_what_platforms_keep():
    pixels = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    assert LongSide(1080)(pixels) is pixels  # platforms do not upscale
    assert LongSide(150)(pixels).shape == (150, 100, 3)
    assert CropAspect(4, 5)(pixels).shape == (250, 200, 3)  # too tall: keep the width
    assert CropAspect(4, 5)(pixels.transpose(1, 0, 2)).shape == (200, 160, 3)  # too wide: keep the height
    assert np.array_equal(CropAspect(4, 5)(pixels), pixels[25:275])
    assert Resample(1.25)(pixels).shape == (375, 250, 3) and Resample(0.8)(pixels).shape == (240, 160, 3)
    assert np.array_equal(PNG()(pixels), pixels)  # lossless


def test_every_pipeline_is_described_with_its_parameters():
    for name in pipelines.PIPELINES:
        text = pipelines.describe(name)
        assert text and all(step.describe() in text for step in pipelines.PIPELINES[name])
    assert "quality 80" in pipelines.describe("downscale 75%, JPEG q80") and "75%" in pipelines.describe(
        "downscale 75%, JPEG q80")
    with pytest.raises(ValueError, match="unknown pipeline 'fax'; known: as stamped, JPEG q60"):
        pipelines.select(["as stamped", "fax"])


def test_a_codec_in_memory_is_the_file_written_and_read(tmp_path):
    """The stage round-trips codecs in memory: the same pixels as a file that Pillow writes and scan.py reads."""
    pixels = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "sent.jpg", quality=75, subsampling=2)
    assert np.array_equal(JPEG(75)(pixels), read_pixels(tmp_path / "sent.jpg"))
    assert np.array_equal(pipelines.apply("JPEG q75", pixels), read_pixels(tmp_path / "sent.jpg"))


def test_rescaled_sizes_are_lanczos_and_the_photo_itself_at_one():
    pixels = np.random.default_rng(3).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    assert rescale(pixels, 1.0) is pixels
    assert rescale(pixels, 2.0).shape == (60, 82, 3) and rescale(pixels, 0.5).shape == (15, 20, 3)
    expected = np.asarray(Image.fromarray(pixels).resize((164, 120), Image.Resampling.LANCZOS))
    assert np.array_equal(rescale(pixels, 4.0), expected)


def test_rates_carry_exact_intervals():
    r = rate(0, 400)
    assert (r["k"], r["n"], r["rate"], r["ci95"][0]) == (0, 400, 0.0, 0.0)
    assert r["ci95"][1] == pytest.approx(0.00917, abs=1e-5)  # the rule of three's exact counterpart
    assert rate(7, 7)["ci95"][1] == 1.0 and rate(0, 0)["rate"] is None


# ------------------------------------------------------------------ the stage is stamp.py and scan.py
def run_stage(model, photos, *, sizes=(1.0,), names=("as stamped", "JPEG q75"), calibrate=False, **settings):
    scanner = PhotoScanner(ScanSettings(model=str(model), device="cpu", working_size=32, seed=5, **settings),
                           log=lambda *_: None, calibration=not calibrate)
    stage = ProductStage(scanner, photos, StageSettings(sizes=sizes, other_photos=2, pipelines=names,
                                                        calibrate=calibrate), log=lambda *_: None)
    return stage, stage.run()


def test_the_stage_gives_the_verdicts_scan_py_gives_to_the_files_stamp_py_writes(models, photos, tmp_path, capsys):
    plain, _ = models
    _, results = run_stage(plain, photos, threshold=0.0)
    block = results["sizes"]["1×"]
    # the same photos through the real tools: stamp.py writes PNGs, the platform recompresses them as JPEG q75
    assert cli(stamp, ["--model", plain, *photos, "--out", tmp_path / "stamped", "--working_size", "32"],
               capsys)[0] == 0
    for kind in ("clean", "stamped"):
        for pipeline in ("as stamped", "JPEG q75"):
            files = []
            for photo in photos:
                source = photo if kind == "clean" else tmp_path / "stamped" / (photo.stem + ".png")
                target = tmp_path / kind / pipeline / (photo.stem + ".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pipelines.apply(pipeline, read_pixels(source))).save(target)
                files.append(target)
            code, out, _ = cli(scan, ["--model", plain, *files, "--working_size", "32", "--threshold", "0",
                                      "--json", "--device", "cpu"], capsys)
            verdicts = "".join(json.loads(line)["verdict"][0] for line in out.splitlines())
            assert block["verdicts"][pipeline][kind] == verdicts, (kind, pipeline)
    row = block["rows"]["JPEG q75"]
    assert row["stamped_caught"]["k"] == block["verdicts"]["JPEG q75"]["stamped"].count("s")
    assert row["clean_read_clean"]["n"] == len(photos) == block["photos"]


def test_every_size_is_stamped_at_its_own_resolution_through_the_working_size(models, photos):
    plain, _ = models
    stage, results = run_stage(plain, photos, sizes=(1.0, 0.5, 4.0), threshold=0.0)
    assert list(results["sizes"]) == ["1×", "½×", "4×"]
    assert results["sizes"]["4×"]["long_side"]["max"] == 192 and results["sizes"]["4×"]["photos"] == 2
    assert results["sizes"]["½×"]["long_side"]["max"] == 24 and results["sizes"]["1×"]["photos"] == 5
    # the 4× copy is stamped as stamp.py stamps: the residual is made at the working size (32) and upsampled
    name, clean, stamped = next(stage._photos(4.0))
    assert clean.shape == (144, 192, 3)
    assert np.array_equal(stamped, stamp.stamp_pixels(stage.encoder, clean, 32)[0])
    assert results["settings"]["working_size"] == 32 and results["settings"]["seed"] == 5
    for block in results["sizes"].values():
        assert block["visibility"]["photos"] == block["photos"] and block["visibility"]["psnr"]["mean"] > 0
    assert "### 4×: 2 photos, long side 192–192 px" in render(results)


def test_a_smoothed_stage_judges_with_scan_py_s_rule_and_records_its_seed(models, photos):
    _, smoothed = models
    _, results = run_stage(smoothed, photos, n=32, threshold=0.5, margin=1e6)
    s = results["settings"]
    assert (s["judge"], s["margin"], s["n"], s["seed"], s["sigma"]) == ("smoothed", 1e6, 32, 5, SIGMA)
    for row in results["sizes"]["1×"]["rows"].values():  # a margin no copy reaches: every vote says clean
        assert row["clean_read_clean"]["rate"] == 1.0 and row["stamped_missed"]["rate"] == 1.0
        assert row["copies_per_verdict"]["max"] <= 32


def test_calibration_is_chosen_after_the_pipelines_and_verified_under_the_rule(models, photos, tmp_path):
    plain, smoothed = models
    stage, results = run_stage(plain, photos, calibrate=True)
    choice = results["calibration"]
    highest_clean = max(max(p["clean"]) for p in choice["photo_scores"])
    # STAMPED iff score > threshold: at or above the highest clean score after any pipeline, none is flagged
    assert results["settings"]["threshold"] == choice["chosen"] >= highest_clean
    assert len(choice["photo_scores"]) == 5 and all(len(p["stamped"]) == 2 for p in choice["photo_scores"])
    record = calibration_record(results, evaluated="x")
    assert (record["rule"], record["n_clean"], record["false_positives"], record["backed"]) == (RULE, 5, 0, False)
    assert record["threshold"] == choice["chosen"] and record["margin"] is None and record["n"] is None
    # a smoothed scanner: the margin of its base classifier is calibrated, the vote threshold stays ½
    _, results = run_stage(smoothed, photos, calibrate=True, n=32)
    record = calibration_record(results)
    assert record["threshold"] == 0.5 and record["margin"] == results["calibration"]["chosen"]
    assert (record["n"], record["sequential"], record["judge"]) == (32, True, "smoothed")
    # the figure of the worst photos' flattest regions
    assert stage.figure(results, tmp_path / "v.png").exists()


def test_evaluate_product_only_writes_its_tables_and_refuses_a_bad_size(models, photos, tmp_path, capsys):
    import evaluate
    plain, _ = models
    argv = ["--checkpoint", plain, "--data_path", photos[0].parent, "--product", "only", "--product_sizes", "1,2",
            "--product_photos", "1", "--working_size", "32", "--device", "cpu", "--out", tmp_path / "eval"]
    results = evaluate.main([str(a) for a in argv])
    assert list(results["product"]["sizes"]) == ["1×", "2×"] and results["product"]["sizes"]["2×"]["photos"] == 1
    assert results["settings"]["seed"] == results["product"]["settings"]["seed"]  # drawn once, recorded
    assert {p.name for p in (tmp_path / "eval").iterdir()} >= {"results.json", "product.md", "visibility.png"}
    code, _, err = cli(evaluate, [*argv[:-4], "--product_sizes", "1,-2", "--out", tmp_path / "e2"], capsys)
    assert code == 2 and "--product_sizes '1,-2': give positive factors" in err
