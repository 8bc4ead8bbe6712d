"""Pieces of the shared loop: losses, warm-up ramp, metrics, checkpoints, LPIPS loading."""
import os

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.evaluation import amplify, border_energy_ratio, evaluate
from engine.losses import load_lpips, pair_labels, residual_regularisation, yuv_mse
from engine.training import image_loss_ramp


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


def test_image_loss_ramp_is_off_in_warmup_then_linear():
    assert image_loss_ramp(0, 100, 50) == 0.0
    assert image_loss_ramp(99, 100, 50) == 0.0
    assert image_loss_ramp(125, 100, 50) == pytest.approx(0.5)
    assert image_loss_ramp(150, 100, 50) == 1.0
    assert image_loss_ramp(10_000, 100, 50) == 1.0
    assert image_loss_ramp(0, 0, 0) == 1.0
    assert image_loss_ramp(10, 0, 40) == pytest.approx(0.25)


def test_pair_labels_are_clean_then_stamped():
    assert pair_labels(3, "cpu").tolist() == [0, 0, 0, 1, 1, 1]


def test_border_energy_ratio_flags_a_border_stripe():
    even = torch.randn(2, 3, 64, 64) * 0.01
    assert border_energy_ratio(even).max() < 1.5
    stripe = even.clone()
    stripe[:, :, :4] += 0.1  # the shortcut: energy hidden along the top border
    assert border_energy_ratio(stripe).min() > 10
    assert torch.isnan(border_energy_ratio(torch.randn(1, 3, 10, 10))).all()


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


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 3, "w": torch.ones(2)}, path)
    save_checkpoint({"step": 4, "w": torch.zeros(2)}, path)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left behind
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and torch.equal(state["w"], torch.zeros(2))
    assert load_checkpoint(path)["step"] == 4


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


def test_lpips_loads_with_its_weights_or_says_clearly_why_not(tmp_path, monkeypatch):
    # An empty hub cache: without network the AlexNet weights cannot be had, and we must say so, not
    # silently use a random backbone. With network (or weights placed there) LPIPS must really work.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    lines = []
    model = load_lpips("cpu", log=lines.append)
    if model is None:
        assert len(lines) == 1 and "LPIPS unavailable" in lines[0] and str(tmp_path) in lines[0]
    else:
        x = torch.rand(1, 3, 32, 32)
        assert model(x, x, normalize=True).item() == pytest.approx(0.0, abs=1e-6)
        assert model(x, torch.rand_like(x), normalize=True).item() > 0.05
