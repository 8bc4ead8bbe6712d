"""train.py end to end on CPU at tiny size: files, resumption (with the random state), weights-only checkpoints,
errors; the training step's loss, labels and image-loss ramp, exactly; the recipes' padding."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import train
from engine import training
from engine.training import Trainer
from models import ScannerConfig, StampEncoder, StampEncoderConfig, load_pretrained
from conftest import TINY_TRAIN_FLAGS as TINY



def _run(tmp_path, *extra, name="t"):
    return train.main(["--run_name", name, "--results_dir", str(tmp_path), *TINY, *extra])


def test_train_writes_checkpoint_tensorboard_and_weights_then_resumes(tmp_path, photo_folder, capsys):
    run = tmp_path / "t"
    _run(tmp_path, "--max_step", "4", "--train_path", str(photo_folder))
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert checkpoint["scheduler"]["last_epoch"] == 4
    assert list((run / "tb").glob("events.out.tfevents.*"))
    args = json.loads((run / "args.json").read_text())
    assert args["max_step"] == 4 and "git_commit" in args
    encoder, scanner, config = load_pretrained(run / "model")
    assert config["step"] == 4 and scanner.config.arch == "narrow"
    assert (run / "eval" / "preview.png").is_file()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert 0 <= summary["test_crops"]["acc"] <= 1 and summary["test_crops"]["n"] > 0

    capsys.readouterr()
    _run(tmp_path, "--max_step", "7", "--train_path", str(photo_folder))
    out = capsys.readouterr()
    assert "resuming" in out.out and "at step 4" in out.out
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 7
    assert checkpoint["scheduler"]["last_epoch"] == 7  # the LR schedule continued, not restarted
    adam_steps = {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {7}  # Adam's moments were carried over, not reset
    assert json.loads((run / "args.json").read_text())["resumed_from_step"] == 4

    # The same command again: nothing left to train, the summary is printed again.
    _run(tmp_path, "--max_step", "7", "--train_path", str(photo_folder))
    assert "step 7 of 7" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 7


def test_train_defaults_to_the_scikit_image_photos(tmp_path, capsys):
    _run(tmp_path, "--max_step", "1")
    out = capsys.readouterr().out
    assert "scikit-image sample photos" in out and "astronaut.png" in out


@pytest.mark.parametrize("recipe, flags, expected", [("robust", [], "replicate"), ("original", [], "zeros"),
                                                     ("robust", ["--padding_mode", "zeros"], "zeros")])
def test_the_recipe_sets_the_padding_of_both_networks(recipe, flags, expected):
    """The border-stripe shortcut (an encoder hiding the stamp along the border of small crops, found by a scanner
    that sees the border) needs zero padding: the robust recipe gives both networks replicate padding, the original
    keeps its zeros, and --padding_mode reaches both. Every convolution that pads at all pads that way."""
    _, args, views = train.parse(["--run_name", "r", "--recipe", recipe, "--device", "cpu", *flags])
    trainer = Trainer(args, views, torch.device("cpu"), log=lambda *a: None)
    for network in (trainer.encoder, trainer.scanner):
        padded = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and any(p > 0 for p in m.padding)]
        assert padded and {m.padding_mode for m in padded} == {expected}, type(network).__name__
    assert StampEncoderConfig().padding_mode == ScannerConfig().padding_mode == "replicate"  # the library default


def test_missing_train_path_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, "--max_step", "1", "--train_path", str(tmp_path / "nowhere"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "error" in err[0]


def test_bad_flag_values_are_refused_by_name(tmp_path, capsys):
    for flags, name in ((["--max_step", "0"], "--max_step"), (["--lr", "-1"], "--lr"),
                        (["--run_name", "a/b"], "--run_name")):
        with pytest.raises(SystemExit):
            train.main(["--run_name", "x", "--results_dir", str(tmp_path), *TINY, *flags])
        assert name in capsys.readouterr().err


@pytest.mark.parametrize("freeze_step, frozen", [("2", True), ("-1", False)])
def test_batchnorm_statistics_freeze_at_bn_freeze_step(tmp_path, photo_folder, freeze_step, frozen):
    flags = ["--train_path", str(photo_folder), "--bn_freeze_step", freeze_step, "--save_every", "2"]
    _run(tmp_path, "--max_step", "2", *flags)
    before = torch.load(tmp_path / "t" / "checkpoints" / "last.pt", weights_only=True)["scanner"]
    _run(tmp_path, "--max_step", "4", *flags)
    after = torch.load(tmp_path / "t" / "checkpoints" / "last.pt", weights_only=True)["scanner"]
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # the scanner still learns
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"]) == frozen


def test_init_from_fine_tunes_from_a_model_at_step_zero(tmp_path, photo_folder, capsys):
    _run(tmp_path, "--max_step", "3", "--train_path", str(photo_folder), name="base")
    base_encoder, base_scanner, _ = load_pretrained(tmp_path / "base" / "model")
    # A different --encoder_width is overridden by the model's architecture; a near-zero LR keeps its weights.
    _run(tmp_path, "--max_step", "1", "--train_path", str(photo_folder), "--init_from", str(tmp_path / "base"),
         "--encoder_width", "0.5", "--lr", "1e-12", "--bn_freeze_step", "0", name="tuned")
    assert "fine-tuning from" in capsys.readouterr().out
    encoder, scanner, config = load_pretrained(tmp_path / "tuned" / "model")
    assert config["step"] == 1 and encoder.config == base_encoder.config
    recorded = json.loads((tmp_path / "tuned" / "args.json").read_text())
    assert recorded["encoder_width"] == 0.5 and recorded["architecture"]["encoder"]["width"] == base_encoder.config.width
    for tuned, base in ((encoder, base_encoder), (scanner, base_scanner)):
        for (name, a), b in zip(tuned.state_dict().items(), base.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    fresh = train.main(["--run_name", "fresh", "--results_dir", str(tmp_path), *TINY, "--max_step", "1",
                        "--train_path", str(photo_folder), "--lr", "1e-12"])
    fresh_encoder, _, _ = load_pretrained(tmp_path / "fresh" / "model")
    assert not torch.allclose(fresh_encoder.to_residual.weight, base_encoder.to_residual.weight)


# ------------------------------------------------------------------------------------------- one step, exactly
class _FakeLPIPS(torch.nn.Module):
    """A stand-in for LPIPS (no AlexNet download in tests): a fixed differentiable distance, > 0 for x' ≠ x. Records
    the `normalize` flag of each call (LPIPS maps [0,1] to its [-1,1] itself only when told to)."""

    def __init__(self):
        super().__init__()
        self.normalize = []

    def forward(self, a, b, normalize=False):
        self.normalize.append(normalize)
        return (a - b).abs().mean((1, 2, 3))


def _trainer(monkeypatch, *flags):
    monkeypatch.setattr(training, "load_lpips", lambda device, log=print: _FakeLPIPS())
    _, args, views = train.parse(["--run_name", "r", *TINY, "--lps_w", "0.5", "--no-channels_last", *flags])
    torch.manual_seed(0)
    return Trainer(args, views, torch.device("cpu"), log=lambda *a: None), args


@pytest.mark.parametrize("flags, weights", [
    # step: 0 … warm-up … ramp over 20 steps … full
    (["--warmup_steps", "10", "--ramp_steps", "20", "--img_w", "3"], {0: 0.0, 9: 0.0, 10: 0.0, 15: 0.25, 20: 0.5,
                                                                      30: 1.0, 31: 1.0}),
    # the original's ramp, img_w times faster: min(img_w·step/ramp_steps, 1)
    (["--warmup_steps", "0", "--ramp_steps", "8", "--img_w", "2", "--ramp_scaled_by_img_w", "on"],
     {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 9: 1.0}),
])
def test_each_step_weighs_the_image_losses_by_the_warmup_and_ramp(monkeypatch, flags, weights):
    """loss = ramp(step)·(img_w·(L_rr + flat_w·L_flat) + lps_w·L_ps) + L_A, with the ramp's value computed here by
    hand (the robust recipe's flat_w 1); L_rr and L_ps are far from 0, so ignoring the ramp (or the warm-up, or its
    slope) changes the total."""
    trainer, args = _trainer(monkeypatch, *flags)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for step, weight in weights.items():
        terms = trainer.step(x, step)
        l_rr, l_ps, l_a = terms["loss/L_rr"], terms["loss/L_ps"], terms["loss/L_A"]
        assert l_rr > 1e-3 and l_ps > 1e-3
        assert args.flat_w == 1.0 and terms["loss/L_flat"] > 1e-3
        expected = weight * (args.img_w * (l_rr + terms["loss/L_flat"]) + 0.5 * l_ps) + l_a
        assert terms["loss/total"].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7), step


def _yuv(x):
    """RGB → YUV with the BT.601 matrix (what kornia.color.rgb_to_yuv uses), written out here."""
    m = torch.tensor([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])
    return torch.einsum("ij,bjhw->bihw", m, x)


def test_a_step_labels_clean_0_and_stamped_1_and_weighs_its_losses_as_the_recipe_says(monkeypatch):
    """Recomputed here on copies of the networks: L_A is rs_w times the cross-entropy of the scanner on [x, x']
    with labels [0]·B + [1]·B (CLEAN = 0, STAMPED = 1), and its accuracy likewise; the robust recipe's L_rr is
    the YUV MSE weighted (Y, U, V) = (1, --u_scale 50, 100) plus 0.1·mean|u| (u: the residual before its bound).
    Flipped labels, the pair stacked as
    [x', x], or another weight give other numbers."""
    trainer, _ = _trainer(monkeypatch, "--rs_w", "2", "--u_scale", "50")
    encoder, scanner = copy.deepcopy(trainer.encoder).train(), copy.deepcopy(trainer.scanner).train()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    terms = trainer.step(x, 0)
    with torch.no_grad():
        unbounded = encoder(x, bounded=False)
        stamped = (x + encoder(x)).clamp(0, 1)
        logits = scanner(torch.cat([x, stamped]))
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    ce = F.cross_entropy(logits, labels)
    assert terms["L_A/plain"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert abs(ce.item() - F.cross_entropy(logits, 1 - labels).item()) > 1e-3  # the test can tell the two apart
    assert terms["acc/plain"].item() == (logits.argmax(1) == labels).float().mean().item()
    assert terms["loss/L_A"].item() == pytest.approx(2 * ce.item(), rel=1e-5)
    yuv = (_yuv(stamped) - _yuv(x)).pow(2).mean((0, 2, 3))
    l_rr = yuv[0] + 50 * yuv[1] + 100 * yuv[2] + 0.1 * unbounded.abs().mean()
    assert terms["loss/L_rr"].item() == pytest.approx(l_rr.item(), rel=1e-4)
    assert terms["loss/L_ps"].item() == pytest.approx(_FakeLPIPS()(stamped, x).mean().item(), rel=1e-5)
    psnr = -10 * torch.log10((stamped - x).pow(2).mean())
    assert terms["train/psnr"].item() == pytest.approx(psnr.item(), rel=1e-5) and 20 < psnr < 80


def test_with_lr_decay_by_epoch_the_rate_decays_after_the_last_step_of_each_epoch(monkeypatch):
    trainer, args = _trainer(monkeypatch, "--lr_decay_unit", "epoch", "--lr_decay", "0.5", "--lr_decay_steps", "1")
    trainer = Trainer(args, trainer.views, torch.device("cpu"), log=lambda *a: None, steps_per_epoch=3)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rates = []
    for step in range(7):
        trainer.step(x, step)
        rates.append(trainer.optimizer.param_groups[0]["lr"] / args.lr)
    assert rates == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.end_to_end
def test_the_training_loader_sends_uint8_and_the_loop_trains_on_floats(tmp_path, photo_folder, monkeypatch):
    """The training DataLoader yields uint8 batches (a quarter of float32's bytes through shared memory and the
    copy to the device); the loop converts each on the training device with to_unit_float, so the trainer's step
    receives float32 in [0, 1]. The held-out loaders stay float32."""
    seen = {}
    real_convert, real_step, real_eval_loader = training.to_unit_float, Trainer.step, training._Run._eval_loader

    def convert(batch, device):
        seen.setdefault("loader", (batch.dtype, tuple(batch.shape)))
        return real_convert(batch, device)

    def step(self, x, step_index):
        seen.setdefault("step", (x.dtype, float(x.min()), float(x.max()), x.device.type))
        return real_step(self, x, step_index)

    def eval_loader(self, paths, max_images):
        loader = real_eval_loader(self, paths, max_images)
        seen["eval"] = loader.dataset.dtype
        return loader

    monkeypatch.setattr(training, "to_unit_float", convert)
    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(training._Run, "_eval_loader", eval_loader)
    _run(tmp_path, "--max_step", "1", "--train_path", str(photo_folder))
    assert seen["loader"] == (torch.uint8, (2, 3, 32, 32))
    dtype, low, high, device = seen["step"]
    assert dtype == torch.float32 and 0 <= low and high <= 1 and device == "cpu"
    assert seen["eval"] == torch.float32


def test_pair_labels_are_made_on_the_device_asked_for():
    from engine.losses import pair_labels, yuv_mse
    labels = pair_labels(3, torch.device("meta"))
    assert labels.device.type == "meta" and labels.dtype == torch.int64 and pair_labels(3, "cpu").tolist() == [0, 0, 0, 1, 1, 1]
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    assert yuv_mse(x, x * 0.5).dtype == torch.float64


def test_a_resumed_run_continues_the_checkpoints_random_stream(tmp_path, photo_folder, monkeypatch):
    """Resuming restores torch's generator to the state the checkpoint saved, after the models are rebuilt (whose
    initialisation draws from it), so random crops, noise and augmentations continue the interrupted stream
    instead of restarting from the seed."""
    states = {}
    real_batches = training._Run.batches

    def recording(self):
        states[self.args.max_step] = torch.get_rng_state()
        return real_batches(self)

    monkeypatch.setattr(training._Run, "batches", recording)
    flags = ["--train_path", str(photo_folder), "--save_every", "2", "--val_every", "100"]
    _run(tmp_path, "--max_step", "2", *flags)
    saved = torch.load(tmp_path / "t" / "checkpoints" / "last.pt", weights_only=True)["rng"]["cpu"]
    _run(tmp_path, "--max_step", "3", *flags)
    assert torch.equal(states[3], saved)
    assert not torch.equal(states[2], saved)  # a fresh start is elsewhere in the stream


def test_the_plain_view_weighs_one_and_perceptual_loss_is_lpips_on_0_1_images():
    pair = torch.rand(4, 3, 8, 8)
    (view,) = training.plain_view()(pair, 0)
    assert view.name == "plain" and view.weight == 1.0 and view.images is pair
    fake_lpips = _FakeLPIPS()
    from engine.losses import perceptual_loss
    assert perceptual_loss(fake_lpips, pair, torch.zeros_like(pair)).item() == pytest.approx(pair.mean().item())
    assert fake_lpips.normalize == [True]


@pytest.mark.parametrize("amp", [True, False])
def test_the_encoder_and_every_scanner_view_run_under_the_amp_setting(amp, monkeypatch):
    """Autocast is a no-op on CPU, so the wiring is checked by recording what _Pair asks for."""
    import contextlib
    asked = []
    monkeypatch.setattr(training, "autocast", lambda device, enabled=True: asked.append((device, enabled))
                        or contextlib.nullcontext())
    encoder = StampEncoder(StampEncoderConfig(width=0.125))
    scanner = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    views = training.combine_views(training.plain_view(), training.plain_view(0.5))
    pair = training._Pair(encoder, scanner, views, torch.device("cpu"), amp=amp)
    _, _, outputs = pair(torch.rand(2, 3, 4, 4), 0)
    assert asked == [(torch.device("cpu"), amp)] * 3 and [v.weight for v, _ in outputs] == [1.0, 0.5]


def test_the_colour_transforms_keep_the_images_dtype_and_run_on_any_device():
    """kornia's own result in float64 on CPU (einsum); the 1×1-convolution path that other devices take checked on
    the meta device (shapes and dtypes only: it holds no values)."""
    import kornia
    from engine.losses import rgb_to_yuv, yuv_to_rgb
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    assert torch.allclose(rgb_to_yuv(x), kornia.color.rgb_to_yuv(x), atol=1e-12) and rgb_to_yuv(x).dtype == x.dtype
    assert torch.allclose(yuv_to_rgb(rgb_to_yuv(x)), x, atol=1e-12)
    meta = torch.empty(2, 3, 5, 7, device="meta", dtype=torch.float16)
    for fn in (rgb_to_yuv, yuv_to_rgb):
        out = fn(meta)
        assert out.device.type == "meta" and out.shape == meta.shape and out.dtype == torch.float16


def test_a_saturated_encoder_is_pulled_back_by_the_l1_term(monkeypatch):
    """An encoder pushed deep into its bound's flat tails (δ = −max_residual on every pixel: a uniform darkening,
    the state a collapsed run ends in) gets no gradient through tanh; the L1 term on the unbounded residual u
    still pulls u back towards 0. Only L_rr acts here (no scanner loss, no LPIPS), so every step must raise the
    output bias. With the L1 term on δ it does not (this test fails on that code)."""
    trainer, args = _trainer(monkeypatch, "--rs_w", "0", "--lps_w", "0", "--lr", "1e-2", "--ramp_steps", "0")
    with torch.no_grad():
        trainer.encoder.to_residual.bias.fill_(-20.0)  # u = −20·max_residual: tanh′ ≈ 1e-17
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    seen, real = [], training.residual_regularisation
    monkeypatch.setattr(training, "residual_regularisation", lambda stamped, original, u, *a: seen.append(u.detach())
                        or real(stamped, original, u, *a))
    biases = [trainer.encoder.to_residual.bias.detach().clone()]
    for step in range(3):
        trainer.step(x, step)
        biases.append(trainer.encoder.to_residual.bias.detach().clone())
    assert seen[0].max() < -10 * args.max_residual  # the L1 term is given u, not δ (which is ≥ −max_residual)
    assert all((after > before + 1e-3).all() for before, after in zip(biases, biases[1:]))


@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_photo_shift_casts_each_training_photo_before_it_is_stamped(monkeypatch, shift):
    """--photo_shift S: the pair the networks train on starts from x with each colour channel of each photo
    shifted by one amount in [−S, S] (clamped to [0,1]); 0 leaves x as it is."""
    trainer, _ = _trainer(monkeypatch, "--photo_shift", str(shift))
    seen = []
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda x, step: seen.append(x.clone()) or forward(x, step))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.25  # no clamping
    trainer.step(x, 0)
    offsets = seen[0] - x
    if shift == 0:
        assert torch.equal(seen[0], x)
        return
    per_channel = offsets.mean((2, 3), keepdim=True)
    assert torch.allclose(offsets, per_channel.expand_as(offsets), atol=1e-6)  # one shift per photo and channel
    assert per_channel.abs().max() <= shift + 1e-6 and per_channel.abs().min() > 0
    assert per_channel.flatten().unique().numel() == 12  # drawn for each photo and channel


def test_grid_shift_crops_each_image_the_scanner_sees_at_its_own_offset(monkeypatch):
    """--grid_shift S: the scanner sees the pair cropped by S rows and columns, each image at its own offset in
    0..S (pixels moved, not resampled); a shift as large as the images is refused up front."""
    trainer, _ = _trainer(monkeypatch, "--grid_shift", "3")
    seen, forward = [], trainer.scanner.forward
    monkeypatch.setattr(trainer.scanner, "forward", lambda images: seen.append(images.detach().clone())
                        or forward(images))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    trainer.step(x, 0)
    assert seen[0].shape == (8, 3, 13, 13)
    offsets = []
    for photo, image in zip(x, seen[0][:4]):  # the clean half: a slice of its own photo
        offsets += [(dy, dx) for dy in range(4) for dx in range(4) if torch.equal(image, photo[:, dy:dy + 13,
                                                                                               dx:dx + 13])]
    assert len(offsets) == 4 and len(set(offsets)) > 1
    with pytest.raises(ValueError, match="--grid_shift 64: needs"):
        _trainer(monkeypatch, "--grid_shift", "64")


def test_random_grid_shift_moves_pixels_keeps_channels_last_and_passes_gradients():
    x = torch.rand(6, 3, 10, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(1)
    shifted = training.random_grid_shift(x, 3)
    assert shifted.shape == (6, 3, 7, 9) and shifted.is_contiguous(memory_format=torch.channels_last)
    offsets = [[(dy, dx) for dy in range(4) for dx in range(4) if torch.equal(image, photo[:, dy:dy + 7, dx:dx + 9])]
               for photo, image in zip(x.detach(), shifted.detach())]
    assert all(len(found) == 1 for found in offsets) and len({found[0] for found in offsets}) > 1
    shifted.sum().backward()
    assert x.grad.sum().item() == 6 * 3 * 7 * 9  # each kept pixel once
    assert training.random_grid_shift(x, 0) is x
