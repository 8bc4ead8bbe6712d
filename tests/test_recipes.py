"""--recipe original: every setting of the original code (../shared/PAPER.md's table, row by row), its flags, its
loss computed by hand for one step of each script, Plain+DA, and old command lines."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import train
import train_rs
import train_rs_aug
from augment.original import FixedOrderChain
from engine import training
from engine.training import Trainer
from conftest import TINY_TRAIN_FLAGS as TINY, tensorboard_tags

SCRIPTS = {"train": train, "train_rs": train_rs, "train_rs_aug": train_rs_aug}
CPU = torch.device("cpu")


def _parse(script, *flags):
    return SCRIPTS[script].parse(["--run_name", "r", *flags])


@pytest.fixture(scope="module")
def original():
    """Each script's parsed flags and views with no flag but --run_name: the original recipe is the default."""
    return {name: _parse(name) for name in SCRIPTS}


# ------------------------------------------------------------------------------- PAPER.md's table, row by row
def test_batch_size_is_64(original):
    assert {args.batch_size for _, args, _ in original.values()} == {64}


def test_adam_5e5_one_group_per_network_and_exponential_lr_per_epoch(original):
    _, args, views = original["train"]
    trainer = Trainer(args, views, CPU, log=lambda *a: None, steps_per_epoch=344)
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and all(g["lr"] == 5e-5 for g in groups)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in trainer.encoder.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in trainer.scanner.parameters()}
    assert trainer.scheduler.gamma == 0.999875 and trainer.lr_every == 344  # once per pass over 344 batches


def test_image_size_400_whole_photo_fitted(original):
    for _, args, _ in original.values():
        assert (args.image_size, args.train_crop, args.max_crop_scale) == (400, "fit", 1.0)


def test_the_original_encoder_and_detector_with_zero_padding_and_an_unbounded_residual(original):
    for _, args, _ in original.values():
        assert (args.encoder, args.scanner, args.padding_mode) == ("stegastamp", "deepraft", "zeros")
        assert args.max_residual == 0  # unbounded


def test_stamped_image_is_not_clamped(original):
    assert not any(args.clamp_stamp for _, args, _ in original.values())


def test_image_loss_weights(original):
    for _, args, _ in original.values():
        assert (args.y_scale, args.u_scale, args.v_scale, args.l1_w, args.img_w, args.lps_w) == (1, 100, 100, 1, 1, 1)


def test_image_loss_ramp_min_img_w_step_1_in_train_and_train_rs_none_in_rs_aug(original):
    for name in ("train", "train_rs"):
        args = original[name][1]
        assert (args.warmup_steps, args.ramp_steps, args.ramp_scaled_by_img_w) == (0, 1, True)
    assert original["train_rs_aug"][1].ramp_steps == 0  # full weight from step 0


def test_fp32_and_no_batchnorm_freeze(original):
    assert {(args.amp, args.bn_freeze_step) for _, args, _ in original.values()} == {("off", -1)}


def test_rs_trains_on_the_noisy_pair_only_with_weight_rs_w(original):
    pair = torch.rand(4, 3, 8, 8)
    (view,) = original["train_rs"][2](pair, 0)
    assert view.name == "noisy" and view.weight == 1.0 and original["train_rs"][1].std == 0.5


def test_rs_aug_has_no_plain_pair_and_ramps_the_aug_weight_only(original):
    _, args, views = original["train_rs_aug"]
    assert not args.plain_ce and not args.aug_strength_ramp
    assert (args.aug_start, args.aug_end, args.aug_w, args.rs_w) == (0, 1, 1.0, 1.0)
    assert [v.name for v in views(torch.rand(4, 3, 8, 8), 5)] == ["noisy", "aug"]


def test_rs_aug_chain_fixed_order_p075_batch_draws_original_ranges():
    _, args, _ = _parse("train_rs_aug")
    from augment.view import augmentation_chain
    chain = augmentation_chain(args, "rs_aug")
    assert isinstance(chain, FixedOrderChain) and chain.p == 0.75 and chain.random_strength == ("jitter",)
    jitter, crop, blur, rotation, perspective, jpeg = chain.corruptions
    assert [c.name for c in chain.corruptions] == ["jitter", "crop", "gaussian_blur", "rotation", "perspective", "jpeg"]
    assert all(c.per_batch for c in chain.corruptions)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.3, 0.3, 0.3, 0.0)
    assert crop.scale == (0.7, 1.0) and rotation.degrees == (0.0, 30.0)
    assert blur.kernel_hw == (7, 3) and blur.sigma == (1.0, 3.0)  # torchvision's kernel_size=(3, 7): 3 wide, 7 tall
    assert perspective.distortion == (0.1, 0.1)
    assert jpeg.quality == (50.0, 100.0) and jpeg.mode == "differentiable"


def test_plain_da_chain_has_its_own_ranges_and_one_jpeg_quality_per_run():
    from augment.original import original_chain
    chain = original_chain("plain_da", p=0.75, seed=3)
    jitter, crop, _, _, perspective, jpeg = chain.corruptions
    assert (jitter.brightness, jitter.hue) == (0.4, 0.0) and crop.scale == (0.4, 1.0)
    assert perspective.distortion == (0.4, 0.4) and chain.random_strength == ()
    q = jpeg.quality
    assert q[0] == q[1] and 50 <= q[0] <= 100
    assert original_chain("plain_da", seed=3).corruptions[-1].quality == q  # a resumed run keeps it


def test_per_batch_draws_are_shared_by_the_batch_and_per_sample_draws_are_not():
    from augment.corruptions import Rotation
    x = torch.rand(1, 3, 24, 24).expand(4, 3, 24, 24).contiguous()
    shared, own = Rotation(degrees=(10, 30)), Rotation(degrees=(10, 30))
    shared.per_batch = True
    torch.manual_seed(0)
    y = shared(x)
    assert all(torch.equal(y[0], y[i]) for i in range(4))
    torch.manual_seed(0)
    y = own(x)
    assert not torch.equal(y[0], y[1])


def test_logging_intervals_and_step_limits(original):
    assert [original[s][1].val_every for s in SCRIPTS] == [2000, 1000, 1000]
    assert {(a.save_every, a.max_step, a.max_epoch) for _, a, _ in original.values()} == {(5000, 40000, 2000)}


def test_robust_is_todays_recipe_and_explicit_flags_win():
    _, args, _ = _parse("train_rs_aug", "--recipe", "robust", "--batch_size", "8", "--aug_chain", "original")
    assert (args.encoder, args.scanner, args.max_residual, args.clamp_stamp, args.amp) == ("unet", "resnet18", 0.05,
                                                                                           True, "on")
    assert (args.batch_size, args.aug_chain, args.aug_prb, args.plain_ce) == (8, "original", 0.5, True)
    assert args.recipe_overrides == ["aug_chain", "batch_size"]


def test_the_robust_recipes_losses_ramps_and_padding_are_its_table():
    """The robust recipe's settings that change results, value by value (docs/fidelity.md gives the reasons)."""
    for script in SCRIPTS:
        _, args, _ = _parse(script, "--recipe", "robust")
        assert (args.img_w, args.l1_w, args.lps_w, args.rs_w) == (1.0, 0.1, 1.0, 1.0), script
        assert (args.y_scale, args.u_scale, args.v_scale) == (1.0, 100.0, 100.0), script
        assert (args.warmup_steps, args.ramp_steps, args.ramp_scaled_by_img_w) == (0, 10_000, False), script
        assert (args.padding_mode, args.max_residual, args.clamp_stamp, args.bn_freeze_step) == ("replicate", 0.05,
                                                                                                  True, None)
        assert (args.lr, args.lr_decay, args.lr_decay_steps, args.lr_decay_unit) == (1e-4, 0.5, 100_000, "step")
        assert (args.image_size, args.train_crop, args.batch_size) == (400, "random", 16), script
    # the learning rate halves every 100,000 steps, decayed after every step
    _, args, views = _parse("train", "--recipe", "robust", "--device", "cpu")
    trainer = Trainer(args, views, CPU, log=lambda *a: None, steps_per_epoch=344)
    assert trainer.scheduler.gamma == pytest.approx(0.5 ** (1 / 100_000), rel=1e-15) and trainer.lr_every == 1
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-4, 1e-4]
    _, args, _ = _parse("train_rs_aug", "--recipe", "robust")
    assert (args.aug_chain, args.aug_prb, args.plain_ce, args.aug_strength_ramp) == ("stochastic", 0.5, True, True)
    assert (args.aug_start, args.aug_end, args.aug_w) == (5_000, 100_000, 1.0)


# ------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("script,flags", [
    ("train", "--batch_size 4 --lr 1e-4 --rs_w 2 --img_w 0.5 --lps_w 0.5 --y_scale 2 --u_scale 50 --v_scale 60 "
              "--max_step 10 --max_epoch 3 --aug_prb 0.5 --aug True --log_interval 7 --save_interval 9 "
              "--img_start 2 --img_end 5"),
    ("train_rs", "--std 0.25 --rs_w 3 --log_interval 7 --save_interval 9 --img_start 1 --img_end 3"),
    ("train_rs_aug", "--std 0.75 --aug_w 2 --aug_start 5 --aug_end 50 --aug_prb 0.6 --log_interval 7"),
])
def test_every_original_flag_parses_to_its_meaning(script, flags):
    _, args, _ = _parse(script, *flags.split())
    given = dict(zip(flags.split()[::2], flags.split()[1::2]))
    aliases = {"--log_interval": "val_every", "--save_interval": "save_every", "--img_start": "warmup_steps"}
    for flag, text in given.items():
        if flag in ("--img_end", "--aug"):
            continue
        value = getattr(args, aliases.get(flag, flag[2:]))
        assert value == type(value)(text), flag
    if "--img_end" in given:
        assert args.ramp_steps == int(given["--img_end"]) - int(given["--img_start"])
    if "--aug" in given:
        assert args.aug is True


@pytest.mark.parametrize("script,unread", [("train", "--rtt 1 --optim adam --std 0.5"),
                                           ("train_rs", "--aug False --crp_dropout 0.9"),
                                           ("train_rs_aug", "--img_start 3 --adv_w 1 --detector iv3")])
def test_flags_the_original_never_read_are_ignored_with_one_warning(script, unread, capsys):
    _, args, _ = _parse(script, *unread.split())
    err = capsys.readouterr().err
    names = unread.split()[::2]
    assert err.count("warning") == 1 and all(n in err for n in names)
    assert not any(k.startswith("unread_") for k in vars(args))
    if script == "train_rs_aug":
        assert args.warmup_steps == 0  # --img_start is not read by the original train_rs_aug.py


def test_missing_mirflickr_is_one_line_saying_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--run_name", "x", "--max_step", "200000"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "./mirflickr/" in err and "datasets.prepare" in err and "--train_path bundled" in err


def test_fixed_size_networks_refuse_other_sizes_in_one_line(tmp_path, photo_folder, capsys):
    with pytest.raises(SystemExit):
        train.main(["--run_name", "x", "--results_dir", str(tmp_path), "--train_path", str(photo_folder),
                    "--image_size", "64"])
    assert "takes 400x400 images only" in capsys.readouterr().err


# ------------------------------------------------------------------------------- one step, by hand
class _FakeLPIPS(torch.nn.Module):
    """A stand-in for LPIPS (whose AlexNet weights this machine lacks): a fixed differentiable distance."""

    def forward(self, a, b, normalize=False):
        return ((a * 2 - 1) - (b * 2 - 1)).abs().mean((1, 2, 3))


def _yuv(x):
    m = torch.tensor([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])
    return torch.einsum("ij,bjhw->bihw", m, x)


def _ce(logits, labels):
    return -F.log_softmax(logits, 1)[torch.arange(len(labels)), labels].mean()


def _one_step(monkeypatch, script, step, *flags):
    monkeypatch.setattr(training, "load_lpips", lambda device, log=print: _FakeLPIPS())
    # NCHW, so that the test draws the same noise values in the same places as the step
    _, args, views = _parse(script, "--batch_size", "2", "--device", "cpu", "--no-channels_last", *flags)
    torch.manual_seed(0)
    trainer = Trainer(args, views, CPU, log=lambda *a: None)
    encoder, scanner = copy.deepcopy(trainer.encoder), copy.deepcopy(trainer.scanner)
    x = torch.rand(2, 3, 400, 400, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    terms = trainer.step(x, step)
    torch.manual_seed(7)
    with torch.no_grad():
        delta = encoder(x)
        stamped = x + delta  # not clamped
        yuv = (_yuv(stamped) - _yuv(x)).pow(2).mean((0, 2, 3))
        l_rr = yuv[0] + 100 * yuv[1] + 100 * yuv[2] + 1.0 * delta.abs().mean()
        l_ps = _FakeLPIPS()(x, stamped).mean()
        labels = torch.tensor([0, 0, 1, 1])  # ours: clean = 0 (the original's soft targets with clean = 1, swapped)
        pair = torch.cat([x, stamped])
    return args, terms, scanner, pair, labels, l_rr, l_ps


def test_one_train_step_gives_the_original_loss(monkeypatch):
    # step 1 with img_w 0.5: the original's weight min(img_w·step, 1) = 0.5 (ours would say 1 at this step)
    args, terms, scanner, pair, labels, l_rr, l_ps = _one_step(monkeypatch, "train", 1, "--img_w", "0.5")
    with torch.no_grad():
        ce = _ce(scanner(pair), labels)
    expected = 0.5 * (0.5 * l_rr + 1.0 * l_ps) + 1.0 * ce
    assert terms["loss/L_rr"].item() == pytest.approx(l_rr.item(), rel=1e-5)
    assert terms["L_A/plain"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["loss/total"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_plain_da_step_adds_the_augmented_ce(monkeypatch):
    _, terms, scanner, pair, labels, l_rr, l_ps = _one_step(monkeypatch, "train", 0, "--aug")
    with torch.no_grad():
        ce = _ce(scanner(pair), labels)
    assert terms["L_A/plain"].item() == pytest.approx(ce.item(), rel=1e-5)
    # step 0: the image losses weigh 0; the scanner's loss is CE(plain) + CE(aug), each times rs_w = 1
    assert terms["loss/total"].item() == pytest.approx(ce.item() + terms["L_A/aug"].item(), rel=1e-5)


def test_one_train_rs_step_gives_the_original_loss(monkeypatch):
    _, terms, scanner, pair, labels, l_rr, l_ps = _one_step(monkeypatch, "train_rs", 3, "--std", "0.25",
                                                            "--rs_w", "2")
    with torch.no_grad():
        ce = _ce(scanner(pair + 0.25 * torch.randn_like(pair)), labels)  # the same draw: the noise is unclamped
    assert set(k for k in terms if k.startswith("L_A/")) == {"L_A/noisy"}
    assert terms["loss/total"].item() == pytest.approx((l_rr + l_ps + 2 * ce).item(), rel=1e-5)


def test_one_train_rs_aug_step_gives_the_original_loss(monkeypatch):
    # step 1 of an aug ramp from 0 to 4: w_aug = 0.25; no image-loss ramp; no plain pair
    _, terms, scanner, pair, labels, l_rr, l_ps = _one_step(monkeypatch, "train_rs_aug", 1, "--aug_start", "0",
                                                            "--aug_end", "4")
    with torch.no_grad():
        ce = _ce(scanner(pair + 0.5 * torch.randn_like(pair)), labels)
    assert set(k for k in terms if k.startswith("L_A/")) == {"L_A/noisy", "L_A/aug"}
    assert terms["L_A/noisy"].item() == pytest.approx(ce.item(), rel=1e-5)
    expected = l_rr + l_ps + ce + 0.25 * terms["L_A/aug"]
    assert terms["loss/total"].item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------- end to end
@pytest.mark.end_to_end
def test_plain_da_trains_and_resumes(tmp_path, photo_folder):
    flags = ["--run_name", "da", "--results_dir", str(tmp_path), "--train_path", str(photo_folder), *TINY,
             "--aug", "--aug_chain", "original"]
    train.main([*flags, "--max_step", "3"])
    train.main([*flags, "--max_step", "5"])
    run = tmp_path / "da"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
    assert {"L_A/aug", "acc/aug", "L_A/plain"} <= tensorboard_tags(run / "tb")
    assert json.loads((run / "args.json").read_text())["resumed_from_step"] == 3


@pytest.mark.end_to_end
@pytest.mark.parametrize("command", [
    "train.py --run_name X --max_step 200000",
    "train_rs.py --run_name X --max_step 200000 --std 0.5",
    "train_rs_aug.py --run_name X --max_step 200000 --std 0.5 --aug_start 5000 --aug_end 100000",
])
def test_the_original_readme_command_lines_run_the_original_recipe(command, tmp_path, photo_folder, capsys):
    """The original README's lines, with --train_path and a small tail that keeps the run to two steps."""
    script, *flags = command.split()
    module = SCRIPTS[script[:-3]]
    _, args, _ = module.parse([*flags, "--train_path", str(photo_folder)])
    assert (args.recipe, args.batch_size, args.scanner, args.encoder, args.lr) == ("original", 64, "deepraft",
                                                                                  "stegastamp", 5e-5)
    summary = module.main([*flags, "--train_path", str(photo_folder), "--results_dir", str(tmp_path),
                           "--max_step", "2", "--batch_size", "2", "--val_images", "1", "--test_images", "1"])
    assert summary["step"] == 2 and "recipe original" in capsys.readouterr().out
