"""Pieces of the shared loop: losses, warm-up ramp, metrics, checkpoints, LPIPS loading."""
import os

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.evaluation import amplify, border_energy_ratio, evaluate
from engine.losses import load_lpips, pair_labels, residual_regularisation, yuv_mse
from engine.recipes import describe, settings
from engine.training import image_loss_ramp, ramp
from models import StampEncoder, StampEncoderConfig


def test_yuv_mse_weighs_chroma_100_times_luma():
    x = torch.full((1, 3, 8, 8), 0.5)
    grey_shift = x + 0.01  # equal RGB change: pure luma
    red_shift = x.clone()
    red_shift[:, 0] += 0.01  # changes chroma too
    luma = yuv_mse(grey_shift, x)
    assert luma == pytest.approx(1e-4, rel=1e-3)  # Y changes by 0.01, U and V not at all
    assert yuv_mse(red_shift, x) > 10 * luma


def test_residual_regularisation_adds_l1_of_the_residual():
    x = torch.rand(2, 3, 8, 8)
    residual = torch.full_like(x, 0.02)
    base = residual_regularisation(x + residual, x, residual, l1_weight=0.0).item()
    assert residual_regularisation(x + residual, x, residual, l1_weight=1.0).item() == pytest.approx(base + 0.02, rel=1e-4)


def test_the_l1_term_acts_on_the_unbounded_residual_where_the_bound_has_no_gradient():
    """δ = m·tanh(u/m) saturated at −m: the MSE part's gradient through tanh has vanished, the L1 part's has not
    (l1_weight/N per element, pointing u back towards 0)."""
    encoder = StampEncoder(StampEncoderConfig(width=0.125, max_residual=0.05))
    x = torch.rand(1, 3, 4, 4) * 0.5 + 0.25
    u = torch.full_like(x, -1.0, requires_grad=True)
    residual_regularisation(x + encoder.bound(u), x, u, l1_weight=0.1).backward()
    assert torch.allclose(u.grad, torch.full_like(u, -0.1 / u.numel()), rtol=1e-4)
    assert torch.allclose(encoder.bound(u), torch.full_like(u, -0.05))


def test_image_loss_ramp_is_off_in_warmup_then_linear():
    assert image_loss_ramp(0, 100, 50) == 0.0
    assert image_loss_ramp(99, 100, 50) == 0.0
    assert image_loss_ramp(125, 100, 50) == pytest.approx(0.5)
    assert image_loss_ramp(150, 100, 50) == 1.0
    assert image_loss_ramp(10_000, 100, 50) == 1.0
    assert image_loss_ramp(0, 0, 0) == 1.0
    assert image_loss_ramp(10, 0, 40) == pytest.approx(0.25)


def test_the_ramp_is_linear_from_start_to_end_and_a_step_when_they_meet():
    assert [ramp(s, 10, 20) for s in (9, 10, 15, 20, 21)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert (ramp(4, 5, 5), ramp(5, 5, 5)) == (0.0, 1.0)


def test_the_recipes_table_per_script_and_in_the_help():
    assert describe("lr", "train") == " [original: 5e-05; robust: 0.0001; robust_v1: 0.0001]"
    assert describe("val_every", "train") == " [original: 2000; robust: 1000; robust_v1: 1000]"
    assert describe("val_every", "train_rs") == " [original: 1000; robust: 1000; robust_v1: 1000]"  # the original's
    # robust_v1: the robust recipe as the shipped models were trained, without issue 37's shaping and resampling
    assert {k for k in settings("robust", "train") if settings("robust", "train")[k] != settings("robust_v1", "train")[k]
            } == {"jnd", "flat_w", "aug_resample", "augs"}
    assert settings("robust_v1", "train_rs_aug")["augs"].split(",") == [
        "rotation", "crop", "jitter", "gaussian_blur", "defocus", "perspective", "noise", "resize", "jpeg"]
    assert settings("original", "train_rs_aug")["ramp_steps"] == 0 and settings("original", "train")["ramp_steps"] == 1
    with pytest.raises(ValueError, match=r"^unknown recipe 'fast'; choose one of \['original', 'robust', 'robust_v1'\]$"):
        settings("fast", "train")


def test_pair_labels_are_clean_then_stamped():
    assert pair_labels(3, "cpu").tolist() == [0, 0, 0, 1, 1, 1]


def test_border_energy_ratio_is_the_worst_sides_energy_over_the_interiors():
    """Closed forms on residuals built here: flat or ±c everywhere → exactly 1 whatever the sign; value d on a
    band-wide stripe along any one side and c elsewhere → d²/c² (the worst side, whichever it is); a stripe of half
    the band → (d² + c²)/(2c²); energy between band and 2·band from a side is not the interior's; NaN when the image has no interior (side ≤ 4·band)."""
    c, d, band = 0.01, 0.1, 4
    flat = torch.full((1, 3, 32, 40), c)
    checker = flat * (torch.arange(40) % 2 * 2 - 1)  # ±c: the same energy everywhere
    assert border_energy_ratio(flat, band).tolist() == pytest.approx([1.0], rel=1e-6)
    assert border_energy_ratio(checker, band).tolist() == pytest.approx([1.0], rel=1e-6)
    stripes = flat.repeat(4, 1, 1, 1)
    stripes[0, :, :band] = d  # top
    stripes[1, :, -band:] = d  # bottom
    stripes[2, :, :, :band] = d  # left
    stripes[3, :, :, -band:] = -d  # right, negative: energy is δ²
    assert border_energy_ratio(stripes, band).tolist() == pytest.approx([(d / c) ** 2] * 4, rel=1e-5)
    half = flat.clone()
    half[:, :, :band // 2] = d
    assert border_energy_ratio(half, band).item() == pytest.approx((d ** 2 + c ** 2) / (2 * c ** 2), rel=1e-5)
    # the interior starts 2·band from each side: energy in rows band..2·band is in no side's stripe but the left
    # and right ones (4 of their 32 rows), and not in the interior
    ring = flat.clone()
    ring[:, :, band:2 * band] = d
    assert border_energy_ratio(ring, band).item() == pytest.approx((4 * d ** 2 + 28 * c ** 2) / (32 * c ** 2), rel=1e-5)
    assert torch.isnan(border_energy_ratio(torch.randn(2, 3, 16, 40), band)).all()  # 16 ≤ 4·4: no interior


def test_amplify_maps_zero_to_grey_and_stretches():
    residual = torch.zeros(1, 3, 4, 4)
    residual[0, 0, 0, 0] = 0.01
    residual[0, 1, 0, 0] = -0.01
    out = amplify(residual)
    assert out[0, 2, 0, 0] == 0.5 and out[0, 0, 0, 0] == 1.0 and out[0, 1, 0, 0] == 0.0


class _Stub(torch.nn.Module):
    """An encoder adding a fixed +0.01 and a scanner reading 'stamped' when the mean exceeds a threshold."""

    def __init__(self, role):
        super().__init__()
        self.role = role

    def forward(self, x):
        if self.role == "encoder":
            return torch.full_like(x, 0.01)
        score = (x.mean((1, 2, 3)) - 0.5) * 1000
        return torch.stack([-score, score], 1)


def test_evaluate_counts_accuracy_and_psnr():
    images = [torch.full((3, 16, 16), 0.495), torch.full((3, 16, 16), 0.495)]
    metrics = evaluate(_Stub("encoder"), _Stub("scanner"), torch.utils.data.DataLoader(images, batch_size=1), "cpu")
    assert metrics["n"] == 2
    assert metrics["acc_clean"] == 1.0 and metrics["acc_stamped"] == 1.0  # 0.495 → clean, 0.505 → stamped
    assert metrics["psnr"] == pytest.approx(40.0, abs=0.01)  # δ = 0.01 everywhere


def test_checkpoint_round_trip_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 3, "w": torch.ones(2)}, path)
    save_checkpoint({"step": 4, "w": torch.zeros(2)}, path)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    state = load_checkpoint(path)
    assert state["step"] == 4 and torch.equal(state["w"], torch.zeros(2))


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """torch.save writes part of the file, then fails (a full disk, a crash): the previous last.pt must still load,
    which only writing elsewhere and renaming guarantees. An in-place write would have destroyed it."""
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 3, "w": torch.arange(1000.0)}, path)
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save({"step": 4}, f)  # bytes reach the file ...
        raise OSError("No space left on device")  # ... and the write fails before the end

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"step": 4, "w": torch.zeros(1000)}, path)
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(1000.0))


def test_a_checkpoint_is_renamed_into_place(tmp_path, monkeypatch):
    """The new file replaces last.pt by one os.replace from a file beside it (atomic on POSIX), never by writing
    into last.pt."""
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    replaced = []
    real_replace = os.replace

    def recording(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst), load_checkpoint(src)["step"]))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording)
    save_checkpoint({"step": 2}, path)
    (src, dst, step), = replaced
    assert dst == str(path) and os.path.dirname(src) == str(tmp_path) and src != dst and step == 2
    assert load_checkpoint(path)["step"] == 2


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _RunsCode()}, path)
    with pytest.raises(ValueError, match="evil.pt: refused"):
        load_checkpoint(path)


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="last.pt: truncated or corrupted"):
        load_checkpoint(path)


ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def _alexnet_features() -> torch.nn.Sequential:
    """torchvision's AlexNet.features, layer for layer (what lpips slices), with seeded random weights: a stand-in
    for the downloaded backbone, 10 MB in memory instead of a 233 MB file."""
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                         nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                         nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))


@pytest.fixture
def alexnet(monkeypatch, tmp_path):
    """torchvision.models.alexnet replaced (lpips calls it by attribute): `available` True gives the stand-in
    backbone, False raises what torchvision raises offline. `requests` records each call's `pretrained`. torch.hub's
    folder is tmp_path/hub. Nothing touches the network or a real cache."""
    import types
    import urllib.error
    import torchvision

    class Fake:
        available = True
        requests = []

    def fake(pretrained=False, **kwargs):
        Fake.requests.append(bool(pretrained or kwargs.get("weights")))
        if not Fake.available:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        return types.SimpleNamespace(features=_alexnet_features())

    monkeypatch.setattr(torchvision.models, "alexnet", fake)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return Fake


def test_lpips_with_its_backbone_is_a_frozen_pretrained_lpips(alexnet):
    lines = []
    model = load_lpips("cpu", log=lines.append)
    assert lines == [] and alexnet.requests == [True]  # the pretrained backbone was asked for, never a random one
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, y = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).split(1)
    assert model(x, x, normalize=True).item() == 0.0
    assert model(x, y, normalize=True).item() > 0


def test_lpips_without_its_backbone_is_none_with_one_line_saying_where_to_put_it(alexnet, tmp_path):
    alexnet.available = False
    lines = []
    assert load_lpips("cpu", log=lines.append) is None
    assert alexnet.requests == [True]
    assert lines == [f"LPIPS unavailable, so L_ps is off and LPIPS is not reported: torchvision could not load the "
                     f"AlexNet weights (<urlopen error [Errno -2] Name or service not known>). To enable it, put "
                     f"{ALEXNET_FILE} in {tmp_path / 'hub'}/checkpoints/."]
