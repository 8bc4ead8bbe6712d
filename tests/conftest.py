"""Shared by the tests: tiny training flags, a folder of photos made here, a script runner, one-thread runs, and
no downloads."""
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

#: Flags that make a training run take seconds on CPU: 32 px crops, tiny networks, no LPIPS download attempt.
TINY_TRAIN_FLAGS = ["--recipe", "robust", "--image_size", "32", "--batch_size", "2", "--scanner", "narrow", "--encoder_width", "0.25",
                    "--lps_w", "0", "--device", "cpu", "--log_every", "1", "--val_every", "3",
                    "--save_every", "3", "--val_images", "4", "--test_images", "4"]


def pytest_configure(config):
    config.addinivalue_line("markers", "end_to_end: runs evaluate.py or a training script through (seconds each); "
                                       "`-m 'not end_to_end'` leaves the unit tests (what `make mutation` runs)")


@pytest.fixture(scope="session", autouse=True)
def no_downloads(tmp_path_factory):
    """Tests never download and never read a cache outside the project: torch.hub's folder (where torchvision keeps
    the AlexNet weights LPIPS needs) is an empty one made here, for this process and the scripts it starts, and
    any download raises at once. So LPIPS is unavailable in every test, the same with or without network, unless
    a test injects its backbone (tests/test_engine.py). Returns the hub folder."""
    hub = tmp_path_factory.mktemp("torch_hub")

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"tests never download ({url})")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "download_url_to_file", refuse)
        mp.setattr(torch.hub, "_hub_dir", str(hub))
        mp.setenv("TORCH_HOME", str(hub.parent / "torch_home"))  # subprocesses: an empty cache too
        yield hub


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """Twelve smooth random 'photos' of odd sizes, made here; nothing is downloaded."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        h, w = 41 + 3 * i, 57 + 2 * i
        low = rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8)
        Image.fromarray(low).resize((w, h), Image.BICUBIC).save(folder / f"im{i}.png")
    return folder


def tensorboard_tags(tb_dir) -> set:
    """Every scalar and image tag a run wrote to TensorBoard."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    tags = set()
    for path in tb_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            tags.update(value.tag for value in event.summary.value)
    return tags


def cli(module, argv, capsys):
    """Run a script's main(argv) (stamp, scan, evaluate, models.convert_original, ...) → (exit status, stdout,
    stderr); the arguments may be paths."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model_folders(root, sigma: float = 0.25):
    """Two tiny untrained model folders under root, the same weights: (plain, smoothed at σ), for scan.py and the
    product stage."""
    from models import Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, save_pretrained
    torch.manual_seed(0)
    encoder = StampEncoder(StampEncoderConfig(width=0.25))
    scanner = Scanner(ScannerConfig("narrow"))
    return save_pretrained(root / "plain", encoder, scanner), \
        save_pretrained(root / "smoothed", encoder, scanner, extra={"sigma": sigma})
