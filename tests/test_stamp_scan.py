"""stamp.py and scan.py end to end, with a tiny model trained here on the photos scikit-image ships."""
import json
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import evaluate
import scan
import stamp
import train
import train_rs
from conftest import TINY_TRAIN_FLAGS as TINY, cli
from smoothing import Smooth

#: Small working resolution, to match the tiny training crops (32 px) and keep every test fast.
WS = ["--working_size", "64"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny plain model that detects its stamp at a 64-px working resolution (about 25 s on 2 CPU cores).

    The image losses stay weak (img_w 0.1, a long ramp), so the stamp saturates the ±0.05 bound (about 26 dB):
    a test model that must detect reliably after 600 steps, not a good one (300 steps sufficed on an earlier
    machine and missed stamps on this one, old code and new alike: the tiny model is marginal)."""
    results = tmp_path_factory.mktemp("results")
    train.main(["--run_name", "tiny", "--results_dir", str(results), *TINY, "--max_step", "600", "--lr", "1e-3",
                "--ramp_steps", "2000", "--batch_size", "8", "--img_w", "0.1", "--val_every", "1000",
                "--save_every", "1000", "--log_every", "50"])
    return results / "tiny" / "model"


@pytest.fixture
def photos(tmp_path):
    """Three scikit-image photos (colour and grey) saved as PNG and JPEG in tmp/in."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "sub" / "coffee.jpg", quality=95)
    Image.fromarray(skimage.data.camera()).save(folder / "camera.png")
    return folder


def scan_json(model_dir, inputs, capsys, *flags):
    code, out, err = cli(scan, ["--model", model_dir, *inputs, *WS, "--json", *flags], capsys)
    return code, [json.loads(line) for line in out.splitlines()], err


def verdicts(records):
    return {r["path"].rsplit("/", 1)[-1]: r["verdict"] for r in records}


def test_working_resolution_keeps_the_aspect_and_never_upscales():
    assert stamp.working_shape(3000, 4000, 512) == (384, 512)
    assert stamp.working_shape(4000, 3000, 64) == (64, 48)
    assert stamp.working_shape(300, 200, 512) == (300, 200)  # smaller: native
    assert stamp.working_shape(3000, 4000, 0) == (3000, 4000)  # 0: native
    assert scan.DEFAULT_WORKING_SIZE == stamp.DEFAULT_WORKING_SIZE == 512
    assert scan.build_parser().get_default("working_size") == stamp.build_parser().get_default("working_size")


def test_stamped_photos_are_detected_and_clean_ones_are_not(model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code, text, _ = cli(stamp, ["--model", model, photos, "--out", out, *WS], capsys)
    assert code == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["astronaut.png", "camera.png", "sub/coffee.png"]  # relative paths mirrored, PNG
    psnrs = [float(line.split("PSNR ")[1].split(" dB")[0]) for line in text.splitlines() if " -> " in line]
    assert len(psnrs) == 3 and all(20 < p < 60 for p in psnrs)
    assert "mean PSNR" in text and "long side 64 px" in text
    for source, rel in (("astronaut.png", "astronaut.png"), ("sub/coffee.jpg", "sub/coffee.png")):
        with Image.open(photos / source) as a, Image.open(out / rel) as b:
            assert a.size == b.size and b.mode == "RGB"

    code, records, err = scan_json(model, [photos, out], capsys)
    assert code == 0 and len(records) == 6 and "6 of 6" in err
    clean = [r for r in records if "/in/" in r["path"]]
    stamped = [r for r in records if "/out/" in r["path"]]
    assert [r["verdict"] for r in clean] == ["clean"] * 3, clean
    assert [r["verdict"] for r in stamped] == ["stamped"] * 3, stamped
    for r in records:
        assert r["threshold"] == 0 and r["calibrated"] is False and r["scanned_at"][0] <= 64
        assert (r["score"] > 0) == (r["verdict"] == "stamped")

    code, text, _ = cli(scan, ["--model", model, out / "astronaut.png", photos / "camera.png", *WS], capsys)
    lines = text.splitlines()
    assert lines[0].startswith(f"{out / 'astronaut.png'}: STAMPED score ")
    assert "> threshold 0 (uncalibrated)" in lines[0]
    assert lines[1].startswith(f"{photos / 'camera.png'}: CLEAN score ") and "≤ threshold 0" in lines[1]


def test_a_stamped_photo_saved_as_jpeg_q90_is_still_detected(model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(stamp, ["--model", model, photos / "astronaut.png", "--out", out, *WS], capsys)[0] == 0
    Image.open(out / "astronaut.png").save(tmp_path / "forwarded.jpg", quality=90)  # Pillow's 4:2:0 chroma
    # stamp.py's own JPEG output, quality 90
    assert cli(stamp, ["--model", model, photos / "camera.png", "--out", out, "--quality", "90", *WS], capsys)[0] == 0
    with Image.open(out / "camera.jpg") as image:
        assert image.format == "JPEG"
    _, records, _ = scan_json(model, [tmp_path / "forwarded.jpg", out / "camera.jpg", photos / "camera.png"], capsys)
    assert [r["verdict"] for r in records] == ["stamped", "stamped", "clean"], records


def test_a_12_megapixel_photo_round_trips(model, tmp_path, capsys):
    big = Image.fromarray(skimage.data.chelsea()).resize((4000, 3000), Image.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=95)
    code, text, _ = cli(stamp, ["--model", model, tmp_path / "big.jpg", "--out", tmp_path / "out", *WS], capsys)
    assert code == 0 and "4000×3000, stamp made at 64×48" in text
    with Image.open(tmp_path / "out" / "big.png") as image:
        assert image.size == (4000, 3000)
    _, records, _ = scan_json(model, [tmp_path / "out" / "big.png", tmp_path / "big.jpg"], capsys)
    assert [r["verdict"] for r in records] == ["stamped", "clean"], records
    assert records[0]["size"] == [4000, 3000] and records[0]["scanned_at"] == [64, 48]


def test_exif_orientation_is_applied_so_the_output_is_upright(model, tmp_path, capsys):
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10] = 255  # white band at the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert cli(stamp, ["--model", model, tmp_path / "phone.jpg", "--out", tmp_path / "out", *WS], capsys)[0] == 0
    with Image.open(tmp_path / "out" / "phone.png") as image:
        upright = np.asarray(image)
        assert image.size == (40, 60) and not image.getexif().get(0x0112)
    assert upright[:, -10:].mean() > 200 and upright[:, :10].mean() < 60  # the band is now on the right


def test_inputs_are_never_overwritten(model, photos, tmp_path, capsys):
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    single = photos / "astronaut.png"
    code, _, err = cli(stamp, ["--model", model, single, "--out", photos, "--overwrite", *WS], capsys)
    assert code == 2 and f"{single}: is the input" in err and "not even with --overwrite" in err
    code, _, err = cli(stamp, ["--model", model, photos, "--out", photos / "sub", "--overwrite", *WS], capsys)
    assert code == 2 and "lies inside the input folder" in err
    link = tmp_path / "elsewhere"
    link.mkdir()
    (link / "astronaut.png").hardlink_to(single)  # another name of the same file
    code, _, err = cli(stamp, ["--model", model, single, "--out", link, "--overwrite", *WS], capsys)
    assert code == 2 and "is the input" in err
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.rglob(".*.tmp"))


def test_an_existing_output_is_refused_without_overwrite(model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "camera.png").write_bytes(b"keep me")
    code, _, err = cli(stamp, ["--model", model, photos / "astronaut.png", photos / "camera.png", "--out", out, *WS],
                       capsys)
    assert code == 2 and f"{out / 'camera.png'}: already exists" in err and "--overwrite" in err
    assert (out / "camera.png").read_bytes() == b"keep me" and not (out / "astronaut.png").exists()  # nothing done
    code, _, _ = cli(stamp, ["--model", model, photos / "camera.png", "--out", out, "--overwrite", *WS], capsys)
    assert code == 0
    with Image.open(out / "camera.png") as image:
        assert image.size == (512, 512)
    # two inputs that would share one output
    (tmp_path / "b").mkdir()
    shutil.copy(photos / "camera.png", tmp_path / "b" / "camera.png")
    code, _, err = cli(stamp, ["--model", model, photos / "camera.png", tmp_path / "b" / "camera.png", "--out",
                               tmp_path / "c", *WS], capsys)
    assert code == 2 and "would both be written to" in err


@pytest.fixture
def broken(photos):
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "text.jpg").write_text("not a photo\n")
    data = (photos / "sub" / "coffee.jpg").read_bytes()
    (photos / "sub" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (photos / "empty_folder").mkdir()
    return photos


def test_broken_files_are_reported_and_the_batch_goes_on_in_stamp(model, broken, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    code, out, err = cli(stamp, ["--model", model, broken, missing, "--out", tmp_path / "out", *WS], capsys)
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["astronaut.png", "camera.png", "coffee.png"]
    assert f"{broken / 'zero.jpg'}: zero-byte file (skipped)" in err
    assert f"{broken / 'text.jpg'}: not a recognised image format" in err
    assert f"{broken / 'sub' / 'truncated.jpg'}: truncated or corrupt image data" in err
    assert f"{missing}: no such file or directory" in err
    assert "stamped 3 of 7 image(s)" in out and "(4 failed)" in out and "Traceback" not in err
    code, _, err = cli(stamp, ["--model", model, broken / "empty_folder", "--out", tmp_path / "out2", *WS], capsys)
    assert code == 1 and "empty_folder: no image files" in err


def test_broken_files_are_reported_and_the_batch_goes_on_in_scan(model, broken, tmp_path, capsys):
    code, records, err = scan_json(model, [broken, tmp_path / "missing.png", broken / "empty_folder"], capsys)
    assert code == 1 and len(records) == 8
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in records}
    assert by_name["zero.jpg"] == {"path": str(broken / "zero.jpg"), "verdict": "error", "error": "zero-byte file"}
    assert by_name["text.jpg"]["error"] == "not a recognised image format"
    assert by_name["truncated.jpg"]["error"].startswith("truncated or corrupt image data")
    assert by_name["missing.png"]["error"] == "no such file or directory"
    assert by_name["empty_folder"]["error"].startswith("no image files")
    assert [by_name[n]["verdict"] for n in ("astronaut.png", "camera.png", "coffee.jpg")] == ["clean"] * 3
    assert "scanned 3 of 8 image(s)" in err and "5 unreadable" in err
    code, text, _ = cli(scan, ["--model", model, broken / "zero.jpg", *WS], capsys)
    assert code == 1 and text.strip() == f"{broken / 'zero.jpg'}: ERROR zero-byte file"


def _calibrated_copy(model, tmp_path, **record):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    (copy / "calibration.json").write_text(json.dumps(record))
    return copy


def test_calibration_json_is_used_when_present(model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(stamp, ["--model", model, photos / "astronaut.png", "--out", out, *WS], capsys)[0] == 0
    stamped = out / "astronaut.png"
    copy = _calibrated_copy(model, tmp_path, rule=scan.RULE, score=scan.PLAIN_SCORE, sigma=None, threshold=1e6,
                            target_fpr=0.01, backed=True, n_clean=3000)
    _, records, err = scan_json(copy, [stamped], capsys)
    assert records[0]["verdict"] == "clean" and records[0]["threshold"] == 1e6 and records[0]["calibrated"] is True
    assert "calibrated, FPR ≤ 1%" in err
    code, text, _ = cli(scan, ["--model", copy, stamped, *WS, "--threshold=-1e6"], capsys)  # the flag wins
    assert code == 0 and "STAMPED" in text and "(--threshold)" in text
    # a calibration of another kind of score (a smoothed scanner's votes) is not used for the plain scanner
    other = tmp_path / "other"
    other.mkdir()
    copy = _calibrated_copy(model, other, rule=scan.RULE, score=scan.SMOOTHED_SCORE, sigma=0.25, threshold=0.7,
                            target_fpr=0.01)
    _, records, err = scan_json(copy, [stamped], capsys)
    assert records[0]["verdict"] == "stamped" and records[0]["calibrated"] is False
    assert "calibrates 'fraction of noisy samples read as stamped' at σ 0.25" in err


def test_evaluate_writes_the_calibration_that_scan_uses(model, photos, tmp_path, capsys):
    """--write_calibration: the product stage chooses the threshold on the photos after its pipelines, judges them
    under that rule, and writes calibration.json; scan.py then judges by it, with no note at its defaults."""
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    argv = ["--checkpoint", copy, "--data_path", photos, "--quick", "--working_size", "64", "--product", "only",
            "--device", "cpu", "--write_calibration", "--out", tmp_path / "eval"]
    results = evaluate.main([str(a) for a in argv])
    calibration = json.loads((copy / "calibration.json").read_text())
    product = results["product"]
    assert calibration["rule"] == scan.RULE and calibration["score"] == scan.PLAIN_SCORE
    assert calibration["threshold"] == product["calibration"]["chosen"] == product["settings"]["threshold"]
    assert calibration["sigma"] is None and calibration["backed"] is False  # a few clean photos back nothing
    assert calibration["evaluated"] == str(tmp_path / "eval" / "results.json") and calibration["working_size"] == 64
    photo_scores = product["calibration"]["photo_scores"]
    assert calibration["n_clean"] == len(photo_scores) == product["sizes"]["1×"]["photos"]
    # the threshold lies above every clean photo's highest score after any pipeline (none may be flagged)
    assert all(max(p["clean"]) < calibration["threshold"] for p in photo_scores)
    assert calibration["false_positives"] == product["sizes"]["1×"]["clean_flagged_any"]["k"] == 0
    capsys.readouterr()
    _, records, err = scan_json(copy, [photos / "camera.png"], capsys)
    assert records[0]["threshold"] == calibration["threshold"] and records[0]["calibrated"] is True
    assert "too few to back FPR ≤ 1%" in err and "note:" not in err
    with pytest.raises(SystemExit):  # an existing calibration is kept unless --overwrite
        evaluate.main([str(a) for a in argv[:-1]] + [str(tmp_path / "eval2")])
    assert "calibration.json: exists; pass --overwrite" in capsys.readouterr().err


def test_smoothed_verdict_is_predict_at_one_half():
    for n, votes in [(10, 0), (10, 5), (10, 10), (100, 38), (100, 62), (100, 66), (1000, 450), (1000, 560)]:
        counts = torch.tensor([n - votes, votes])
        assert scan.smoothed_verdict(votes, n, 0.5, 0.01) == Smooth.decide(counts, 0.01), (n, votes)
    for t in (0.0, 1.0):  # no test can tell a share from 0 or 1
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            scan.smoothed_verdict(0, 1000, t, 0.001)
    assert scan.smoothed_verdict(900, 1000, 0.1, 0.001) == 1 and scan.smoothed_verdict(110, 1000, 0.1, 0.001) == -1


def test_a_smoothed_scan_gives_votes_and_a_certified_radius(model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(stamp, ["--model", model, photos / "astronaut.png", "--out", out, *WS], capsys)[0] == 0
    flags = ["--sigma", "0.02", "--n", "60", "--certify", "--n0", "10", "--batch_size", "30"]
    _, records, err = scan_json(model, [out / "astronaut.png", photos / "astronaut.png"], capsys, *flags)
    stamped, clean = records
    assert "σ 0.02, n 60" in err and "sequential PREDICT" in err and stamped["threshold"] == 0.5 and stamped["sigma"] == 0.02
    assert (stamped["verdict"], stamped["certified"]) == ("stamped", "stamped")
    assert (clean["verdict"], clean["certified"]) == ("clean", "clean")
    # sequential PREDICT: 16 of 16 votes already decide (the first look), the certificate still uses --n fresh copies
    assert "first decisive look of 16, 60 copies" in err
    assert (stamped["votes"], stamped["n_used"], stamped["n"]) == (16, 16, 60) and stamped["score"] == 1.0
    assert stamped["certify_n"] == 60 and 0 < stamped["radius"] < 4 * 0.02
    _, records, err = scan_json(model, [out / "astronaut.png"], capsys, *flags, "--sequential", "off")
    assert (records[0]["votes"], records[0]["n_used"]) == (60, 60) and "sequential" not in err
    # 60 of 60 votes cannot tell a share above 0.99 from 0.99 at alpha 0.001: abstain
    _, records, _ = scan_json(model, [out / "astronaut.png"], capsys, "--sigma", "0.02", "--n", "60",
                              "--threshold", "0.99")
    assert records[0]["verdict"] == "abstain"


def test_a_model_trained_with_std_is_judged_smoothed(photos, tmp_path, capsys):
    train_rs.main(["--run_name", "rs", "--results_dir", str(tmp_path), "--max_step", "2", "--std", "0.25", *TINY])
    model_dir = tmp_path / "rs" / "model"
    assert json.loads((model_dir / "config.json").read_text())["sigma"] == 0.25
    capsys.readouterr()
    _, records, err = scan_json(model_dir, [photos / "camera.png"], capsys, "--n", "20")
    assert records[0]["sigma"] == 0.25 and records[0]["n"] == 20 and "σ 0.25, n 20" in err
    _, records, _ = scan_json(model_dir, [photos / "camera.png"], capsys, "--plain")
    assert "sigma" not in records[0]
    # evaluate.py finds the σ of a bare model folder too (no args.json beside it)
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    args = evaluate.build_parser().parse_args(["--checkpoint", str(bare), "--out", str(tmp_path / "e")])
    assert evaluate.Evaluation(args, log=lambda *_: None).sigma == 0.25


@pytest.mark.parametrize("module, flags, message", [
    (stamp, ["--model", "/no/such/model", "x.png", "--out", "o"], "--model /no/such/model: no such folder"),
    (scan, ["--model", "/no/such/model", "x.png"], "--model /no/such/model: no such folder"),
    (stamp, ["--model", "M", "x.png", "--out", "o", "--quality", "0"], "--quality"),
    (scan, ["--model", "M", "x.png", "--certify"], "--certify needs a smoothed scanner"),
    (scan, ["--model", "M", "x.png", "--sigma", "0.1", "--threshold", "2"], "--threshold 2"),
    (scan, ["--model", "M", "x.png", "--sigma", "0.1", "--plain"], "not allowed with"),
])
def test_bad_flags_are_one_line_with_status_2(model, module, flags, message, capsys):
    code, _, err = cli(module, [model if f == "M" else f for f in flags], capsys)
    assert code == 2 and message in err and "Traceback" not in err
