"""models.convert_original: the original authors' released detectors, read without running their pickle, and
scan.py / stamp.py / evaluate.py with the scanner-only folders it writes."""
import collections
import hashlib
import json
import os
import pickle
import shutil
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import nn

import evaluate
import scan
import stamp
from models import CLEAN, Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, load_pretrained, save_pretrained
from models import convert_original
from models.convert_original import OriginalCheckpointError, convert, read_original, write_converted
from models.io import load_state_checked
from conftest import cli

#: ../shared beside the repository (CI has it there)
SHARED = Path(__file__).resolve().parents[2] / "shared"
ORIGINAL = SHARED / "original"
BSDS = SHARED / "data" / "bsds400"
VARIANTS = ("baseline", "rs/sigma_0.25", "rs/sigma_0.5", "rs/sigma_0.75", "rs_aug")
#: what the five pickles name (pickletools), rs_aug's also an unused torch.nn.Sigmoid
GLOBALS = {"__builtin__.set", "collections.OrderedDict", "model.Conv2D", "model.Dense", "model.StampDetector",
           "torch.FloatStorage", "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor_v2",
           "torch.nn.modules.container.Sequential", "torch.nn.modules.conv.Conv2d", "torch.nn.modules.linear.Linear"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant → the model folder its detector.pth converts to."""
    root = tmp_path_factory.mktemp("converted")
    return {v: write_converted(ORIGINAL / v / "detector.pth", root / v.replace("/", "_")) for v in VARIANTS}


def original_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The original StampDetector's forward, by hand from its raw tensors: log_softmax, clean = class 1."""
    h = x - 0.5
    for i in range(5):
        h = F.relu(F.conv2d(h, state[f"model.{i}.conv.weight"], state[f"model.{i}.conv.bias"],
                            stride=2 if i < 4 else 1, padding=1))
    h = F.relu(F.linear(h.flatten(1), state["fc1.linear.weight"], state["fc1.linear.bias"]))
    return F.log_softmax(F.linear(h, state["fc2.linear.weight"], state["fc2.linear.bias"]), 1)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@torch.no_grad()
def test_the_released_detectors_convert_and_compute_what_the_original_does(converted):
    x = torch.rand(3, 3, 400, 400, generator=torch.Generator().manual_seed(0))
    for variant, folder in converted.items():
        path = ORIGINAL / variant / "detector.pth"
        state, info = read_original(path)
        assert info["class"] == "model.StampDetector"
        expected = GLOBALS | ({"torch.nn.modules.activation.Sigmoid"} if variant == "rs_aug" else set())
        assert set(info["globals"]) == expected, variant

        # the written weights load strictly into our port of the architecture
        weights = load_file(str(folder / "scanner.safetensors"))
        port = Scanner(ScannerConfig("deepraft", "zeros")).eval()
        load_state_checked(port, weights, variant)
        assert set(weights) == {"net." + k for k in state}
        encoder, scanner, config = load_pretrained(folder)
        assert encoder is None and scanner.config == ScannerConfig("deepraft", "zeros")
        assert config["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert "swapped" in config["source"]["label_order"] and "encoder" not in config

        reference = original_forward(state, x)  # clean = class 1
        for model in (port, scanner):
            ours = F.log_softmax(model(x), 1)  # clean = class 0
            torch.testing.assert_close(ours, reference.flip(1), rtol=0, atol=1e-5)
            assert not torch.allclose(ours, reference, atol=1e-3), f"{variant}: label order not swapped"


def fake_original(monkeypatch, classes: int = 2, padding_mode: str = "zeros") -> nn.Module:
    """A StampDetector of the original's shape, its classes in a module named `model` as in the original
    repository, so that torch.save pickles it the way the released files are pickled."""
    fake = types.ModuleType("model")

    class Conv2D(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.activation = "relu"
            self.conv = nn.Conv2d(cin, cout, 3, stride, 1, padding_mode=padding_mode)

        def forward(self, x):
            return F.relu(self.conv(x))

    class Dense(nn.Module):
        def __init__(self, fin, fout, activation="relu"):
            super().__init__()
            self.activation = activation
            self.linear = nn.Linear(fin, fout)

        def forward(self, x):
            x = self.linear(x)
            return F.relu(x) if self.activation else x

    class StampDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(Conv2D(3, 8, 2), Conv2D(8, 16, 2), Conv2D(16, 32, 2), Conv2D(32, 64, 2),
                                       Conv2D(64, 1))
            self.fc1 = Dense(625, 100)
            self.fc2 = Dense(100, classes, None)

        def forward(self, x):
            return F.log_softmax(self.fc2(self.fc1(torch.flatten(self.model(x - 0.5), 1))), 1)

    for cls in (Conv2D, Dense, StampDetector):
        cls.__module__, cls.__qualname__ = "model", cls.__name__
        setattr(fake, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "model", fake)
    return StampDetector().eval()


@torch.no_grad()
def test_a_detector_saved_here_converts_and_wrong_ones_are_one_line(monkeypatch, tmp_path):
    detector = fake_original(monkeypatch)
    torch.save(detector, tmp_path / "detector.pth")
    scanner, _ = convert(tmp_path / "detector.pth")
    x = torch.rand(2, 3, 400, 400, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(F.log_softmax(scanner(x), 1), detector(x).flip(1), rtol=0, atol=1e-5)

    for kwargs, expected in (({"classes": 3}, "2 shape or dtype mismatch(es), e.g. net.fc2.linear.bias: weights (3,)"),
                             ({"padding_mode": "reflect"}, "model.0.conv has (stride, padding")):
        torch.save(fake_original(monkeypatch, **kwargs), tmp_path / "wrong.pth")
        with pytest.raises(ValueError) as e:
            convert(tmp_path / "wrong.pth")
        assert str(e.value).startswith(f"{tmp_path / 'wrong.pth'}: ") and expected in str(e.value)
        assert "\n" not in str(e.value)


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A file in torch.save's zip layout whose archive/data.pkl is `data_pkl`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", bytes(8))
    return path


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_names_any_other_global_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "marker"
    exec_payload = f"cbuiltins\nexec\n(Vopen({str(marker)!r}, 'w').close()\ntR.".encode()
    payloads = {
        "os.system": f"cos\nsystem\n(Vtouch {marker}\ntR.".encode(),
        "builtins.exec": exec_payload,
        "subprocess.call": f"csubprocess\ncall\n((Vtouch\nV{marker}\nltR.".encode(),
        # after globals that are allowed: an OrderedDict holding a reduce to os.system (posix.system on Linux)
        f"{os.system.__module__}.system": pickle.dumps({"a": collections.OrderedDict(b=_System(f"touch {marker}"))}, protocol=2),
    }
    # control: an ordinary unpickler does run the payload
    control = tmp_path / "control"
    pickle.loads(exec_payload.replace(str(marker).encode(), str(control).encode()))
    assert control.exists()

    for name, payload in payloads.items():
        path = torch_zip(tmp_path / f"{name}.pth", payload)
        with pytest.raises(OriginalCheckpointError) as e:
            read_original(path)
        message = str(e.value)
        assert message.startswith(f"{path}: refused") and f"global {name}," in message and "\n" not in message
        assert not marker.exists(), name

    out = tmp_path / "out"
    code, _, err = cli(convert_original, [tmp_path / "os.system.pth", "--out", out], capsys)
    assert code == 2 and "os.system" in one_line(err) and str(tmp_path / "os.system.pth") in err
    assert not marker.exists() and not out.exists()


def test_files_that_are_not_torch_zips_give_one_line_naming_the_file(tmp_path, capsys):
    plain = tmp_path / "plain.pth"
    plain.write_bytes(b"\x80\x02}q\x00." * 10)  # a pickle, but not in a zip: torch's legacy format
    truncated = tmp_path / "truncated.pth"
    data = (ORIGINAL / "baseline" / "detector.pth").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (plain, truncated):
        code, _, err = cli(convert_original, [path, "--out", tmp_path / "out"], capsys)
        line = one_line(err)
        assert code == 2 and f"error: {path}: not a torch.save file" in line
    code, _, err = cli(convert_original, [tmp_path / "missing.pth", "--out", tmp_path / "o"],
                       capsys)
    assert code == 2 and f"{tmp_path / 'missing.pth'}: no such file" in one_line(err)
    assert not (tmp_path / "out").exists()


def test_an_existing_model_is_replaced_only_with_force(converted, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(converted["baseline"], folder)
    before = (folder / "scanner.safetensors").read_bytes()
    argv = [ORIGINAL / "rs_aug" / "detector.pth", "--out", folder]
    code, _, err = cli(convert_original, argv, capsys)
    assert code == 2 and "scanner.safetensors: already exists; pass --force" in one_line(err)
    assert (folder / "scanner.safetensors").read_bytes() == before
    code, out, _ = cli(convert_original, [*argv, "--force"], capsys)
    assert code == 0 and (folder / "scanner.safetensors").read_bytes() != before
    assert json.loads((folder / "config.json").read_text())["source"]["file"].endswith("rs_aug/detector.pth")


def test_a_scanner_only_folder_loads_but_a_missing_encoder_file_is_still_an_error(converted, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(converted["baseline"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["encoder"] = {}  # says it has an encoder, but encoder.safetensors is not there
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"encoder\.safetensors: missing"):
        load_pretrained(folder)


def fitted_bsds(count: int = 64) -> torch.Tensor:
    """The first `count` photos of bsds400 in sorted order, fitted like the original's ImageOps.fit."""
    photos = []
    for path in sorted(BSDS.iterdir())[:count]:
        with Image.open(path) as image:
            fitted = ImageOps.fit(image.convert("RGB"), (400, 400))
        photos.append(torch.from_numpy(np.array(fitted)).permute(2, 0, 1).float() / 255)
    return torch.stack(photos)


@torch.no_grad()
def test_baseline_and_rs_aug_read_clean_photos_as_clean(converted):
    x = fitted_bsds(64)
    for variant in ("baseline", "rs_aug"):
        _, scanner, _ = load_pretrained(converted[variant])
        clean = int((scanner(x).argmax(1) == CLEAN).sum())
        assert clean >= 0.99 * 64, f"{variant}: {clean} of 64 clean photos read as clean"


def test_scan_fits_photos_for_a_converted_model_and_stamp_refuses_it(converted, tmp_path, capsys):
    folder = converted["baseline"]
    photos = sorted(BSDS.iterdir())[:2]
    code, out, err = cli(scan, ["--model", folder, *photos, "--json"], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["path"] for r in records] == [str(p) for p in photos]
    for r, path in zip(records, photos):
        with Image.open(path) as image:
            assert r["size"] == list(image.size)
        assert r["verdict"] == "clean" and r["score"] < 0 and r["scanned_at"] == [400, 400]
    assert err.count("fitted to 400×400") == 1 and "2 of 2" in err

    code, _, err = cli(stamp, ["--model", folder, photos[0], "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert one_line(err) == f"stamp.py: error: {folder} holds a scanner only (converted from the original code): it " \
                            f"cannot stamp"
    assert not any((tmp_path / "out").rglob("*.png"))


def test_stamp_fits_photos_for_the_original_encoder(tmp_path, capsys):
    torch.manual_seed(0)
    save_pretrained(tmp_path / "m", StampEncoder(StampEncoderConfig(arch="stegastamp")),
                    Scanner(ScannerConfig("deepraft", "zeros")))
    photo = sorted(BSDS.iterdir())[0]
    code, out, err = cli(stamp, ["--model", tmp_path / "m", photo, "--out", tmp_path / "out"], capsys)
    assert code == 0 and err.count("fitted to 400×400") == 1
    with Image.open(tmp_path / "out" / f"{photo.stem}.png") as written, Image.open(photo) as original:
        assert written.size == (400, 400)
        fitted = np.array(ImageOps.fit(original.convert("RGB"), (400, 400)))
        # the reported PSNR is against the photo fitted as the original code fits it
        assert f"PSNR {stamp.psnr(np.array(written), fitted):.2f} dB" in out and f"{original.size[0]}×" in out


def test_evaluate_judges_the_clean_photos_of_a_scanner_only_model(converted, tmp_path, capsys):
    data = tmp_path / "photos"
    data.mkdir()
    for path in sorted(BSDS.iterdir())[:4]:
        shutil.copy(path, data)
    results = evaluate.main(["--checkpoint", str(converted["rs_aug"]), "--data_path", str(data), "--quick",
                             "--out", str(tmp_path / "eval"), "--device", "cpu"])
    s = results["settings"]
    assert s["scanner_only"] and "stamped" in s["note"] and s["fitted_to"] == 400 and s["images"] == 4
    for row in results["table1"].values():
        assert row["n"] == 4 and row["acc_stamped"] is None and row["auc"] is None
        assert row["fpr"] + row["acc_clean"] + row["abstain"] == pytest.approx(1)
    assert results["table1"]["none"]["acc_clean"] == 1
    assert results["calibration"] is None and results["table3"] is None and results["table2"]["psnr"]["n"] == 0
    markdown = (tmp_path / "eval" / "tables.md").read_text()
    assert "**Scanner only**" in markdown and "false positives %" in markdown
    assert not (tmp_path / "eval" / "roc.png").exists()
    capsys.readouterr()
    code, _, err = cli(evaluate, ["--checkpoint", converted["rs_aug"], "--data_path", data, "--quick", "--out",
                                  tmp_path / "eval2", "--write_calibration"], capsys)
    assert code == 2 and "holds a scanner only" in one_line(err) and not (tmp_path / "eval2").exists()


def test_sigma_is_recorded_so_that_scan_judges_the_rs_detector_smoothed(tmp_path, capsys):
    folder = tmp_path / "rs025"
    code, _, _ = cli(convert_original, [ORIGINAL / "rs" / "sigma_0.25" / "detector.pth", "--out", folder,
                                        "--sigma", "0.25"], capsys)
    assert code == 0 and json.loads((folder / "config.json").read_text())["sigma"] == 0.25
    code, out, _ = cli(scan, ["--model", folder, sorted(BSDS.iterdir())[0], "--json", "--n", "20"], capsys)
    record = json.loads(out)
    assert code == 0 and record["sigma"] == 0.25 and record["n"] == 20 and "votes" in record


def test_init_from_a_scanner_only_folder_is_one_line(converted, tmp_path, capsys):
    import train
    code, _, err = cli(train, ["--run_name", "x", "--results_dir", tmp_path, "--train_path", BSDS,
                               "--init_from", converted["baseline"]], capsys)
    assert code == 2 and "holds a scanner only" in err.strip().splitlines()[-1]
