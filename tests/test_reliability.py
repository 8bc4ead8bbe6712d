"""Reliability and security: faults during training, untrusted checkpoints and weights, bad images at every
entry point, and bounded memory. Everything runs on CPU at tiny sizes."""
import gc
import json
import os
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import engine.training
import evaluate
import product.scanning
import scan
import stamp
import train
from conftest import TINY_TRAIN_FLAGS as TINY
from datasets import (ImageFolderDataset, ImageReadError, NoImagesError, UnreadableImageWarning, find_images,
                      load_rgb)
from datasets import prepare
from engine.checkpoint import load_checkpoint, save_checkpoint
from models import Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, load_pretrained, save_pretrained
from smoothing import certify

REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
#: train.py flags for the fault-injection runs: tiny networks, no validation, no LPIPS.
FAULT_FLAGS = ["--recipe", "robust", "--image_size", "32", "--batch_size", "2", "--scanner", "narrow", "--encoder_width", "0.125",
               "--lps_w", "0", "--device", "cpu", "--log_every", "1000", "--val_every", "1000000",
               "--val_images", "2", "--test_images", "2"]
WS = ["--working_size", "64"]


# ------------------------------------------------------------------------------------------------ the corpus
def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG file from its IHDR fields and its compressed scanlines (Pillow writes neither 16-bit RGB nor bombs)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bomb(side: int = 20_000) -> bytes:
    """A real decompression bomb: a valid 1-bit 20000×20000 PNG (400 megapixels, 1.2 GB as RGB) in about 50 kB,
    over twice Pillow's default limit (MAX_IMAGE_PIXELS, 89.5 megapixels), which is left as it is."""
    row = b"\x00" * (1 + side // 8)  # filter byte + 1 bit per pixel
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    return _png(side, side, 1, 0, idat)


#: The bad files of the corpus and what every entry point must say about them.
BAD = {"zero.jpg": "zero-byte file", "truncated.jpg": "truncated or corrupt image data",
       "text.jpg": "not a recognised image format", "one.png": "image is too small (1×1 px",
       "bomb.png": "decompression bomb: 400,000,000 pixels"}
#: Unusual but valid files: each must be read as 8-bit RGB and processed like any photo.
ODD = ["grey16.png", "rgb16.png", "cmyk.jpg", "palette.png"]
GOOD = ["photo_a.png", "photo_b.jpg"]


def make_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    low = rng.uniform(0, 255, (8, 10, 3)).astype(np.uint8)
    photo = Image.fromarray(low).resize((60, 48), Image.BICUBIC)
    photo.save(folder / "photo_a.png")
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "photo_b.jpg", quality=95)
    (folder / "zero.jpg").write_bytes(b"")
    data = (folder / "photo_b.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("a text file, not a photo\n")
    Image.fromarray(np.full((40, 44), 51400, np.uint16)).save(folder / "grey16.png")  # 16-bit grey: 200 in 8 bits
    rgb16 = np.broadcast_to(np.array([65535, 32896, 0], ">u2"), (40, 44, 3))
    (folder / "rgb16.png").write_bytes(_png(44, 40, 16, 2, zlib.compress(b"".join(b"\x00" + r.tobytes()
                                                                                   for r in rgb16))))
    Image.new("CMYK", (44, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    palette = Image.new("P", (44, 40), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.paste(1, (10, 10, 30, 30))
    palette.save(folder / "palette.png", transparency=0)  # blue index 0 transparent: white when read
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one.png")
    (folder / "bomb.png").write_bytes(_bomb())
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder with the good, odd and bad files, an empty folder, a path that does not exist)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "empty").mkdir()
    return make_corpus(root / "in"), root / "empty", root / "missing.jpg"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny model folder: enough for every entry point to read, stamp and scan."""
    torch.manual_seed(0)
    return save_pretrained(tmp_path_factory.mktemp("model") / "tiny", StampEncoder(StampEncoderConfig(width=0.125)),
                           Scanner(ScannerConfig("narrow")))


def cli(main, argv, capsys):
    """Run a CLI's main in this process → (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("evaluate:", "\r"))]
    lines = [line for line in lines if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ faults
def _train_process(results: Path, photos: Path, log: Path, *flags) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", "--run_name", "fault", "--results_dir", str(results), "--train_path",
           str(photos), *FAULT_FLAGS, *flags]
    return subprocess.Popen(cmd, cwd=REPO, env=CHILD_ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(condition, proc, log: Path, timeout: float = 300):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"train.py ended early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _step(path: Path):
    try:
        return load_checkpoint(path)["step"]
    except (FileNotFoundError, ValueError):
        return None


def test_sigterm_saves_sigkill_keeps_the_last_checkpoint_and_the_run_resumes_to_the_end(tmp_path, photo_folder):
    results = tmp_path / "results"
    last = results / "fault" / "checkpoints" / "last.pt"

    # 1. SIGTERM mid-run: the loop finishes its step, saves, says how to resume, and exits with 128 + 15.
    log = tmp_path / "term.log"
    proc = _train_process(results, photo_folder, log, "--max_step", "1000000", "--save_every", "5")
    _wait_for(lambda: (_step(last) or 0) >= 5, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    text = log.read_text()
    found = re.search(r"interrupted at step (\d+); saved (\S+) \(SIGTERM\)\. Run the same command to resume from "
                      r"step (\d+)\.", text)
    assert found, text[-2000:]
    stopped = int(found.group(1))
    assert found.group(2) == str(last) and int(found.group(3)) == stopped and "Traceback" not in text
    checkpoint = load_checkpoint(last)
    assert checkpoint["step"] == stopped >= 5  # saved at the step it stopped, not at the last --save_every
    assert checkpoint["scheduler"]["last_epoch"] == stopped

    # 2. The same command resumes; SIGKILL at a random moment while it saves after every step (about half of
    #    its time is spent saving): the checkpoint on disk is always one whole, loadable checkpoint.
    log = tmp_path / "kill.log"
    proc = _train_process(results, photo_folder, log, "--max_step", "1000000", "--save_every", "1")
    _wait_for(lambda: (_step(last) or 0) > stopped + 2, proc, log)
    time.sleep(random.uniform(0, 0.3))
    proc.kill()
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert f"resuming {results / 'fault'} at step {stopped}" in log.read_text()
    killed = load_checkpoint(last)
    assert killed["step"] > stopped + 2 and killed["scheduler"]["last_epoch"] == killed["step"]
    # whatever the kill interrupted, only a temporary file can be half-written, never last.pt itself
    assert set(os.listdir(last.parent)) <= {"last.pt", "last.pt.tmp"}

    # 3. Resume to the end: every counter continues from the checkpoint the kill left.
    end = killed["step"] + 3
    log = tmp_path / "resume.log"
    proc = _train_process(results, photo_folder, log, "--max_step", str(end), "--save_every", "1000")
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert f"at step {killed['step']} (of {end})" in log.read_text()
    final = load_checkpoint(last)
    assert final["step"] == end and final["scheduler"]["last_epoch"] == end
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {end}  # Adam's moments continued
    _, _, config = load_pretrained(results / "fault" / "model")
    assert config["step"] == end


SAVE_AND_DIE = """
import io, os, signal, sys, torch
from engine import checkpoint
path, where = sys.argv[1], sys.argv[2]
if where == "mid-write":  # half of the new checkpoint reaches the temporary file, then the process dies
    real = torch.save
    def half_then_die(state, f):
        buffer = io.BytesIO()
        real(state, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = half_then_die
else:  # the whole new checkpoint is written, and the process dies just before renaming it over the old one
    checkpoint.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_checkpoint({"step": 2, "w": torch.full((1000,), 2.0)}, path)
print("not reached")
"""


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, where):
    """Deterministic: a process is SIGKILLed from inside save_checkpoint, in the middle of writing, or after
    writing but before the rename."""
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    proc = subprocess.run([sys.executable, "-c", SAVE_AND_DIE, str(path), where], cwd=REPO, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and "not reached" not in proc.stdout, proc.stderr
    assert (tmp_path / "last.pt.tmp").stat().st_size > 0  # the kill did land inside the save
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    save_checkpoint({"step": 3, "w": torch.zeros(3)}, path)  # the next save replaces the leftover
    assert load_checkpoint(path)["step"] == 3 and sorted(os.listdir(tmp_path)) == ["last.pt"]


class _NanGradient(torch.autograd.Function):
    """The identity, with a NaN gradient: a finite loss whose backward poisons every weight upstream."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("fault, log_every, message", [
    ("loss", "50", "non-finite loss/L_rr, loss/total at step 3"),
    ("loss", "1", "non-finite loss/L_rr, loss/total at step 3"),
    ("gradient", "50", "non-finite L_A/plain, loss/L_A, loss/L_flat, loss/L_rr, loss/total, train/psnr at step 4"),
    ("gradient", "3", "non-finite weights at step 3 while every loss term was finite"),
])
def test_a_non_finite_step_stops_the_run_by_name_and_nothing_is_saved_after_it(tmp_path, photo_folder, monkeypatch,
                                                                                   capsys, fault, log_every, message):
    """Step 3 goes wrong: its loss, or (the loss finite) its gradient, which poisons the weights and so every term
    of step 4. Checkpoints every 2 steps: the one of step 4 must not be written, whenever the run logs."""
    real, calls = engine.training.residual_regularisation, []

    def faulty(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            return loss * float("nan") if fault == "loss" else _NanGradient.apply(loss)
        return loss

    monkeypatch.setattr(engine.training, "residual_regularisation", faulty)
    code, _, err = cli(train.main, ["--run_name", "nan", "--results_dir", tmp_path, "--train_path", photo_folder,
                                    *TINY, "--max_step", "10", "--save_every", "2", "--log_every", log_every,
                                    "--val_every", "1000"], capsys)
    assert code == 2
    line = one_line_error(err)
    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    assert message in line and f"the last checkpoint ({last}, step 2) is kept, nothing was saved after it" in line
    state = load_checkpoint(last)
    assert state["step"] == 2
    assert all(t.isfinite().all() for part in ("encoder", "scanner") for t in state[part].values()
               if t.is_floating_point())
    assert not (tmp_path / "nan" / "model").exists()  # no exported weights either


# ------------------------------------------------------------------------------------------------ untrusted files
class _RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_runs_nothing(tmp_path, photo_folder, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "results" / "evil" / "checkpoints" / "last.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"step": 1, "encoder": _RunsCode(marker)}, evil)
    # The control: an ordinary torch.load really would run it.
    control = tmp_path / "control"
    torch.save({"step": 1, "encoder": _RunsCode(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    with pytest.raises(ValueError, match=r"last\.pt: refused.*GLOBAL posix\.system"):
        load_checkpoint(evil)
    code, _, err = cli(train.main, ["--run_name", "evil", "--results_dir", tmp_path / "results", "--train_path",
                                    photo_folder, *TINY, "--max_step", "2"], capsys)
    assert code == 2
    line = one_line_error(err)
    assert f"{evil}: refused" in line and "posix.system" in line
    assert not marker.exists()


def test_damaged_checkpoints_and_weights_are_one_line_in_every_command(tmp_path, tiny_model, photo_folder, capsys):
    # A truncated checkpoint, and one with a flipped byte in its tensor data, stop train.py's resumption.
    run = tmp_path / "results" / "r"
    for damage in ("truncated", "flipped"):
        save_checkpoint({"step": 1, "w": torch.ones(10_000)}, run / "checkpoints" / "last.pt")
        last = run / "checkpoints" / "last.pt"
        data = bytearray(last.read_bytes())
        if damage == "truncated":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        last.write_bytes(bytes(data))
        code, _, err = cli(train.main, ["--run_name", "r", "--results_dir", tmp_path / "results", "--train_path",
                                        photo_folder, *TINY, "--max_step", "2"], capsys)
        line = one_line_error(err)
        assert code == 2 and f"{last}: " in line
        assert ("truncated or corrupted checkpoint" if damage == "truncated" else "fails its CRC-32 check") in line

    # Damaged weights: every command that loads a model names the file and the damage.
    photo = photo_folder / "im0.png"
    commands = {
        "stamp": (stamp.main, lambda m: [photo, "--model", m, "--out", tmp_path / "out", *WS, "--device", "cpu"]),
        "scan": (scan.main, lambda m: [photo, "--model", m, *WS, "--device", "cpu"]),
        "evaluate": (evaluate.main, lambda m: ["--checkpoint", m, "--quick", "--out", tmp_path / "ev", "--device",
                                               "cpu"]),
        "certify": (certify.main, lambda m: ["--model", m, "--sigma", "0.25", "--out", tmp_path / "c.tsv",
                                             "--device", "cpu"]),
    }
    damages = {
        "truncated": (lambda b: b[: len(b) // 2], "not a readable safetensors file"),
        "flipped": (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "damaged or replaced: its SHA-256 differs"),
    }
    for damage, (mangle, reason) in damages.items():
        model = tmp_path / f"model_{damage}"
        shutil.copytree(tiny_model, model)
        weights = model / "scanner.safetensors"
        weights.write_bytes(mangle(weights.read_bytes()))
        for name, (main, argv) in commands.items():
            code, _, err = cli(main, argv(model), capsys)
            line = one_line_error(err)
            assert code == 2 and f"{weights}: {reason}" in line, (name, err)


def test_weights_that_do_not_fit_the_config_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    encoder, scanner = StampEncoder(StampEncoderConfig(width=0.125)), Scanner(ScannerConfig("narrow"))
    with torch.no_grad():
        scanner.fc.bias.fill_(float("nan"))
    save_pretrained(tmp_path / "nan", encoder, scanner)
    with pytest.raises(ValueError, match=r"scanner\.safetensors: 1 tensor\(s\) hold NaN or infinity, e.g. fc\.bias"):
        load_pretrained(tmp_path / "nan")
    config = tmp_path / "nan" / "config.json"
    for text, reason in (('["not", "a", "config"]', "not a model config"),
                         ('{"encoder": {"width": "wide"}, "scanner": {}}', "invalid model config"),
                         ('{"encoder": {}, "scanner": {"arch": "vgg"}}', "unknown scanner arch 'vgg'")):
        config.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{config}: ") + ".*" + re.escape(reason)):
            load_pretrained(tmp_path / "nan")


# ------------------------------------------------------------------------------------------------ bad images
def _assert_bad_files_named(text: str, folder: Path, sep: str = ": "):
    for name, reason in BAD.items():
        assert f"{folder / name}{sep}{reason}" in text, (name, text)


def test_the_corpus_through_the_dataset_loader(corpus):
    folder, empty, missing = corpus
    with pytest.warns(UnreadableImageWarning) as caught:
        dataset = ImageFolderDataset(folder, 16, mode="center")
    at_start = str(caught[0].message)
    for name in set(BAD) - {"truncated.jpg"}:  # headers are checked up front; a truncated body only on decoding
        assert f"{name} ({BAD[name]}" in at_start, at_start
    with pytest.warns(UnreadableImageWarning, match=r"truncated\.jpg: truncated or corrupt image data"):
        batches = list(DataLoader(dataset, batch_size=3))
    assert sum(len(b) for b in batches) == len(GOOD) + len(ODD) + 1  # truncated.jpg's slot gets the next image
    assert all(b.shape[1:] == (3, 16, 16) and b.dtype == torch.float32 for b in batches)
    assert {p.name for p, _ in dataset.skipped} == set(BAD)

    # The odd ones are read as the 8-bit RGB a viewer would show.
    assert load_rgb(folder / "grey16.png").getpixel((0, 0)) == (200, 200, 200)
    assert load_rgb(folder / "rgb16.png").getpixel((0, 0)) == (255, 128, 0)
    assert load_rgb(folder / "palette.png").getpixel((0, 0)) == (255, 255, 255)  # transparent: white
    assert load_rgb(folder / "palette.png").getpixel((20, 20)) == (0, 255, 0)
    red = load_rgb(folder / "cmyk.jpg").getpixel((5, 5))
    assert red[0] > 200 and red[1] < 50 and red[2] < 50
    for name, reason in BAD.items():
        with pytest.raises(ImageReadError, match=re.escape(f"{folder / name}: {reason}")):
            load_rgb(folder / name)
    with pytest.raises(NoImagesError, match=re.escape(f"{empty}: no image files")):
        find_images(empty)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such file")):
        find_images(missing)


def test_the_corpus_through_stamp(corpus, tiny_model, tmp_path, capsys):
    folder, empty, missing = corpus
    out = tmp_path / "out"
    code, text, err = cli(stamp.main, ["--model", tiny_model, folder, empty, missing, "--out", out, *WS,
                                       "--device", "cpu"], capsys)
    assert code == 1 and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(n).stem + ".png" for n in GOOD + ODD)
    assert all(Image.open(p).mode == "RGB" for p in out.iterdir())
    _assert_bad_files_named(err, folder)  # as each happens...
    end = err[err.index("not stamped (7):"):]  # ... and together at the end
    _assert_bad_files_named(end, folder)
    assert f"{empty}: no image files" in end and f"{missing}: no such file or directory" in end
    assert "stamped 6 of 13 image(s)" in text and "(7 failed)" in text


def test_the_corpus_through_scan(corpus, tiny_model, capsys):
    folder, empty, missing = corpus
    code, out, err = cli(scan.main, ["--model", tiny_model, folder, empty, missing, *WS, "--device", "cpu",
                                     "--json"], capsys)
    assert code == 1 and "Traceback" not in err
    records = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert len(records) == 13
    assert all(records[n]["verdict"] in ("clean", "stamped") for n in GOOD + ODD)
    for name, reason in BAD.items():
        assert records[name]["verdict"] == "error" and records[name]["error"].startswith(reason)
    assert records["empty"]["error"].startswith("no image files")
    assert records["missing.jpg"]["error"] == "no such file or directory"
    end = err[err.index("unreadable (7):"):]
    _assert_bad_files_named(end, folder)
    assert "scanned 6 of 13 image(s)" in err


def test_the_corpus_through_evaluate(corpus, tiny_model, tmp_path, capsys):
    folder, empty, missing = corpus
    results = evaluate.main(["--checkpoint", str(tiny_model), "--data_path", str(folder), "--quick", "--size", "16",
                             "--max_images", "22", "--attack_images", "0", "--out", str(tmp_path / "ev"),
                             "--device", "cpu"])
    out = capsys.readouterr().out
    _assert_bad_files_named(out, folder)
    assert "truncated.jpg" in out.split("whose pixel data failed to decode")[1]
    unreadable = {Path(u["path"]).name: u["reason"] for u in results["settings"]["unreadable"]}
    assert set(unreadable) == set(BAD) and all(unreadable[n].startswith(r) for n, r in BAD.items())
    assert results["settings"]["photos"] == len(GOOD) + len(ODD) + len(BAD)
    assert results["settings"]["images"] == 2 * (len(GOOD) + len(ODD) + 1)  # 2 tiles a photo; truncated.jpg's
    # slot is refilled by the next readable photo (reported above)
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["settings"]["unreadable"] == results["settings"]["unreadable"]
    for path, expected in ((empty, f"{empty}: no image files"), (missing, f"{missing}: no such file")):
        code, _, err = cli(evaluate.main, ["--checkpoint", tiny_model, "--data_path", path, "--quick", "--out",
                                           tmp_path / "ev2", "--device", "cpu"], capsys)
        assert code == 2 and expected in one_line_error(err)


def test_the_corpus_through_prepare(corpus, tmp_path, capsys):
    folder, empty, missing = corpus
    code, out, err = cli(prepare.main, ["--src", folder, "--dst", tmp_path / "p", "--size", "16", "--workers", "1",
                                        "--no_progress"], capsys)
    assert code == 0 and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if not p.name.startswith(".")) == \
        sorted(Path(n).stem + ".png" for n in GOOD + ODD)
    for name, reason in BAD.items():
        assert f"  {name}: {reason}" in out, out
    for path, expected in ((empty, "no image files"), (missing, "no such file or folder")):
        code, _, err = cli(prepare.main, ["--src", path, "--dst", tmp_path / "p2"], capsys)
        assert code == 2 and str(path) in err and expected in err


def test_the_corpus_in_a_training_folder(corpus, photo_folder, tmp_path, capsys):
    """Unreadable training photos are named (with the reason) when the run starts and left out; the run goes on.
    --split_seed 5 puts truncated.jpg in the test split, whose photos are decoded at the end of the run."""
    folder, empty, missing = corpus
    data = tmp_path / "data"
    shutil.copytree(photo_folder, data)
    for path in folder.iterdir():
        shutil.copy(path, data / path.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, out, err = cli(train.main, ["--run_name", "t", "--results_dir", tmp_path / "r", "--train_path",
                                             data, *TINY, "--max_step", "2", "--split_seed", "5"], capsys)
    assert isinstance(summary, dict) and summary["step"] == 2, err  # the run finished
    messages = "\n".join(str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning))
    for name in set(BAD) - {"truncated.jpg"}:
        assert f"{name} ({BAD[name]}" in messages, messages
    assert f"{data / 'truncated.jpg'}: {BAD['truncated.jpg']}" in messages
    assert load_checkpoint(tmp_path / "r" / "t" / "checkpoints" / "last.pt")["step"] == 2
    for path, expected in ((empty, f"{empty}: no image files"), (missing, f"{missing}: no such file")):
        code, _, err = cli(train.main, ["--run_name", "e", "--results_dir", tmp_path / "r", "--train_path", path,
                                        *TINY, "--max_step", "1"], capsys)
        assert code == 2 and expected in one_line_error(err)


# ------------------------------------------------------------------------------------------------ resources
def test_scan_holds_one_image_at_a_time(tiny_model, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    alive, most = [], [0]

    def tracked(fn):
        def wrapper(*args, **kwargs):
            value = fn(*args, **kwargs)
            alive.append(weakref.ref(value))
            most[0] = max(most[0], sum(r() is not None for r in alive))
            return value
        return wrapper

    monkeypatch.setattr(product.scanning, "read_pixels", tracked(product.scanning.read_pixels))
    monkeypatch.setattr(product.scanning, "pixels_to_tensor", tracked(product.scanning.pixels_to_tensor))
    code, out, _ = cli(scan.main, ["--model", tiny_model, folder, *WS, "--device", "cpu"], capsys)
    assert code == 0 and len(out.splitlines()) == 40 and len(alive) == 80
    assert most[0] <= 2  # this image's pixels and tensor; nothing of the images before
    gc.collect()
    assert not any(r() is not None for r in alive)


class _Recorder(torch.nn.Module):
    """A scanner that records the size of every batch it is given."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.input_size, self.batches = inner, inner.config, inner.input_size, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.inner(x)


def test_smoothing_never_holds_n_noisy_copies(tiny_model, photo_folder, tmp_path, monkeypatch, capsys):
    """evaluate.py (PREDICT and CERTIFY) and the certify command draw n noisy copies in batches of --noise_batch /
    --batch_size: the scanner never sees more than that at once, though n is many times larger."""
    recorders = []

    def recording(real):
        def load(*args, **kwargs):
            encoder, scanner, config = real(*args, **kwargs)
            recorders.append(_Recorder(scanner))
            return encoder, recorders[-1], config
        return load

    monkeypatch.setattr(evaluate, "load_pretrained", recording(evaluate.load_pretrained))
    monkeypatch.setattr(certify, "load_pretrained", recording(certify.load_pretrained))
    evaluate.main(["--checkpoint", str(tiny_model), "--data_path", str(photo_folder), "--quick", "--size", "16",
                   "--max_images", "2", "--judge", "smoothed", "--sigma", "0.25", "--predict_n", "40",
                   "--certify_n", "100", "--n0", "10", "--certify_images", "1", "--noise_batch", "8",
                   "--attack_images", "0", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    certify.main(["--model", str(tiny_model), "--data_path", str(photo_folder), "--sigma", "0.25", "--n", "100",
                  "--n0", "10", "--batch_size", "8", "--max_images", "1", "--size", "16", "--out",
                  str(tmp_path / "c.tsv"), "--device", "cpu"])
    capsys.readouterr()
    evaluated, certified = recorders
    assert max(evaluated.batches) <= 8 and max(certified.batches) <= 8
    # certification alone: 2 images (clean, stamped) × (n0 + n) samples, all of them seen
    assert sum(certified.batches) == 2 * 110
    assert sum(evaluated.batches) >= 2 * 110 + 2 * 2 * 40
