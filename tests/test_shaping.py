"""Perceptual shaping (issue 37): the JND map, the shaped residual of StampEncoder (config.jnd), the flat-weighted
image loss L_flat (--flat_w), their recipes and flags, a tiny training with both, and the post hoc measurement."""
import json

import numpy as np
import pytest
import torch

import train
from conftest import TINY_TRAIN_FLAGS as TINY, tensorboard_tags
from engine.losses import flat_weighted_mse, flat_weights, yuv_mse
from engine.recipes import settings
from models import StampEncoder, StampEncoderConfig, load_pretrained, save_pretrained, Scanner, ScannerConfig
from models.jnd import FULL_LEVELS, attenuation, jnd_levels, jnd_map
from product.stamping import stamp_pixels
from report.shaping import shaped_versions
from report.visibility import photo_visibility

SCRIPTS = ("train", "train_rs", "train_rs_aug")


def _half_flat(h=32, w=64, level=0.5, std=0.15, seed=0):
    """(1,3,h,w): the left half a flat grey at `level`, the right half grey noise of `std` around it."""
    x = torch.full((1, 3, h, w), level)
    noise = torch.randn(1, 1, h, w // 2, generator=torch.Generator().manual_seed(seed)) * std
    x[..., w // 2:] = (level + noise).clamp(0, 1)
    return x


def _encoder(jnd=0.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    encoder = StampEncoder(StampEncoderConfig(width=0.25, jnd=jnd, **kwargs))
    torch.nn.init.normal_(encoder.to_residual.weight, std=0.3)  # a residual well away from 0
    return encoder.eval()


def _state_from(encoder, jnd):
    other = StampEncoder(StampEncoderConfig(**{**encoder.config.__dict__, "jnd": jnd})).eval()
    other.load_state_dict(encoder.state_dict())
    return other


# ------------------------------------------------------------------------------------------------ the map
def test_the_map_is_lowest_on_a_flat_patch_and_full_in_texture():
    x = _half_flat(level=127 / 255)
    j = jnd_map(x)[0, 0]
    flat, textured = j[4:-4, 4:24], j[4:-4, 40:-4]  # more than 3 px from the step between the halves
    assert torch.allclose(flat, torch.full_like(flat, 3 / FULL_LEVELS), atol=1e-4)  # Chou & Li's 3 levels at 127
    assert textured.mean() > 0.95 and textured.min() > 3 * flat.max()
    assert j[:, 31:33].min() > 2 * flat.max()  # at the edge between the halves: masked too


@pytest.mark.parametrize("level, expected", [(0, 1.0), (127, 3 / 12), (255, 6 / 12)])
def test_luminance_masking_lets_through_most_in_shadow_least_at_mid_grey(level, expected):
    """Flat photos: T = 20 levels at black (clipped to the full allowance 12), 3 at 127 (the minimum), 6 at
    white (3 + 3/128·128)."""
    j = jnd_map(torch.full((1, 3, 9, 11), level / 255))
    assert torch.allclose(j, torch.full_like(j, expected), atol=1e-5)
    assert jnd_levels(torch.full((1, 3, 9, 11), 0.0)).mean().item() == pytest.approx(20.0, abs=1e-4)


def test_the_map_is_a_constant_fp32_of_the_photo_in_any_autocast_and_size():
    x = _half_flat().requires_grad_(True)
    j = jnd_map(x)
    assert j.shape == (1, 1, 32, 64) and j.dtype == torch.float32 and not j.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(jnd_map(x), j)
        assert torch.equal(jnd_map(x.bfloat16()), jnd_map(x.bfloat16().float()))
    for size in [(1, 1), (2, 5), (7, 3)]:
        assert jnd_map(torch.rand(2, 3, *size)).shape == (2, 1, *size)
    assert torch.equal(attenuation(x, 0), torch.ones_like(j)) and torch.equal(attenuation(x, 1), j)
    assert torch.allclose(attenuation(x, 2), j * j)
    with pytest.raises(ValueError, match="strength"):
        attenuation(x, -1)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        jnd_map(torch.rand(1, 1, 8, 8))


# ------------------------------------------------------------------------------------------------ the encoder
def _unshaped_reference(encoder, x):
    """The residual as the encoder computed it before shaping existed: m·tanh(m·r/m), r the 1×1 conv's output."""
    seen = []
    handle = encoder.to_residual.register_forward_hook(lambda module, inputs, output: seen.append(output))
    encoder(x)
    handle.remove()
    m = encoder.config.max_residual
    return m * torch.tanh((m * seen[0]) / m)


@torch.no_grad()
def test_jnd_0_leaves_the_residual_bit_identical_to_the_unshaped_encoder():
    encoder = _encoder(jnd=0.0)
    x = torch.rand(2, 3, 23, 31)
    assert torch.equal(encoder(x), _unshaped_reference(encoder, x))
    assert encoder.shaping(x) is None and torch.equal(encoder.bound(encoder(x, bounded=False)), encoder(x))


@torch.no_grad()
def test_a_config_json_without_the_field_loads_unshaped(tmp_path):
    for shipped in ("baseline", "rs_aug"):  # written before the field existed
        assert "jnd" not in json.loads(open(f"pretrained_models/{shipped}/config.json").read())["encoder"]
    save_pretrained(tmp_path, _encoder(jnd=0.0), Scanner(ScannerConfig("narrow")))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["encoder"]["jnd"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    encoder, _, _ = load_pretrained(tmp_path)
    assert encoder.config.jnd == 0.0
    x = torch.rand(1, 3, 20, 20)
    assert torch.equal(encoder(x), _unshaped_reference(encoder, x))


@torch.no_grad()
def test_the_shipped_baseline_loads_unshaped():
    encoder, _, _ = load_pretrained("pretrained_models/baseline")
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert encoder.config.jnd == 0.0 and torch.equal(encoder(x), _unshaped_reference(encoder, x))


@torch.no_grad()
def test_the_shaped_residual_is_smaller_in_flat_regions_for_the_same_network():
    """Same weights, jnd 1 against 0: δ₁ = ĵ·δ₀ exactly (the map applied after the bound); a quarter of δ₀ on the
    flat mid-grey half, all of it in the texture; the bound is local, |δ₁| ≤ max_residual·ĵ."""
    shaped = _encoder(jnd=1.0)
    plain = _state_from(shaped, 0.0)
    x = _half_flat(level=127 / 255)
    d1, d0 = shaped(x), plain(x)
    assert torch.allclose(d1, jnd_map(x) * d0, atol=1e-7)
    flat, tex = np.s_[..., 4:-4, 4:24], np.s_[..., 4:-4, 40:-4]
    assert d1[flat].abs().mean() < 0.26 * d0[flat].abs().mean()
    assert d1[tex].abs().mean() > 0.9 * d0[tex].abs().mean()
    assert (d1.abs() <= 0.05 * jnd_map(x) + 1e-7).all()
    strong = _state_from(shaped, 2.0)(x)  # the square of the map: a sixteenth on flat mid-grey
    assert strong[flat].abs().mean() < 0.07 * d0[flat].abs().mean()


def test_the_shaped_bound_of_the_unbounded_residual_is_the_residual_and_needs_the_photo():
    """Training's path (forward(bounded=False) under autocast, then bound(u, x) in fp32) gives forward's δ; the
    gradient reaches the encoder through δ·ĵ and none reaches x through the map, even on a flat photo."""
    encoder = _encoder(jnd=1.0).train()
    torch.nn.init.constant_(encoder.to_residual.bias, 3.0)  # past the bound
    x = _half_flat().requires_grad_(True)
    u = encoder(x, bounded=False)
    assert torch.equal(encoder(x), encoder.bound(u, x))
    assert u.abs().max() > 2 * 0.05  # u goes past the bound: the L1 term sees it
    with pytest.raises(ValueError, match="needs the photo"):
        encoder.bound(u)
    encoder.bound(u, x).pow(2).sum().backward()
    assert encoder.to_residual.weight.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    flat = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)
    encoder(flat).sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_the_strength_is_checked():
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="jnd"):
            StampEncoderConfig(jnd=bad)


@torch.no_grad()
def test_stamp_py_shapes_as_the_config_says_and_the_measurement_matches_it():
    """product.stamping.stamp_pixels with config.jnd s stamps what report.shaping's 'jnd s' version does, at native
    size and through the working-size round trip; the matched version keeps the overall energy and moves it out
    of the flat half."""
    rng = np.random.default_rng(0)
    pixels = np.full((40, 72, 3), 128, np.uint8)
    pixels[:, 36:] = np.clip(128 + rng.normal(0, 40, (40, 36, 1)), 0, 255).astype(np.uint8)
    plain = _encoder(jnd=0.0)
    for working_size in (0, 48):
        versions = shaped_versions(plain, pixels, [1.0], working_size)
        for s in (0.0, 1.0):
            stamped, _ = stamp_pixels(_state_from(plain, s), pixels, working_size)
            version = versions["unshaped" if s == 0 else "jnd 1"]
            assert np.abs(stamped.astype(int) - version).max() <= 1 and (stamped != version).mean() < 0.01
    versions = shaped_versions(plain, pixels, [1.0], 0)
    before, shaped, matched = (photo_visibility(pixels, versions[k]) for k in ("unshaped", "jnd 1", "jnd 1, matched"))
    assert matched["psnr"] == pytest.approx(before["psnr"], abs=0.3) and shaped["psnr"] > before["psnr"] + 1
    assert matched["psnr_flat"] > before["psnr_flat"] + 3
    with pytest.raises(ValueError, match="unshaped encoder"):
        shaped_versions(_state_from(plain, 1.0), pixels, [1.0])


# ------------------------------------------------------------------------------------------------ the loss
def test_the_flat_weighted_loss_charges_a_residual_on_a_flat_region_more_than_in_texture():
    """The same residual patch on the flat half or on the textured half: the plain YUV MSE cannot tell them apart,
    L_flat charges the flat one most (weights ĵ^−2, mean 1 per photo: up to 16 times as much)."""
    x = _half_flat(level=127 / 255)
    patch = torch.zeros_like(x)
    on_flat, on_texture = patch.clone(), patch.clone()
    on_flat[..., 8:24, 6:22] = 0.02
    on_texture[..., 8:24, 38:54] = 0.02
    stamped_flat, stamped_tex = x + on_flat, x + on_texture
    assert yuv_mse(stamped_flat, x).item() == pytest.approx(yuv_mse(stamped_tex, x).item(), rel=1e-3)
    flat, tex = flat_weighted_mse(stamped_flat, x), flat_weighted_mse(stamped_tex, x)
    assert flat > 8 * tex
    w = flat_weights(x)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5) and not w.requires_grad
    even = x + 0.02
    assert flat_weighted_mse(even, x).item() == pytest.approx(yuv_mse(even, x).item(), rel=1e-3)  # mean-1 weights


def test_the_flat_weighted_loss_has_a_gradient_to_the_stamped_image():
    x = _half_flat()
    stamped = (x + 0.01).requires_grad_(True)
    flat_weighted_mse(stamped, x).backward()
    g = stamped.grad.abs()[0].sum(0)
    assert g[4:-4, 4:24].mean() > 4 * g[4:-4, 40:-4].mean()


# ------------------------------------------------------------------------------------------------ recipes and flags
@pytest.mark.parametrize("script", SCRIPTS)
def test_shaping_is_off_in_the_original_recipe_and_on_in_robust(script):
    assert (settings("original", script)["jnd"], settings("original", script)["flat_w"]) == (0.0, 0.0)
    assert (settings("robust", script)["jnd"], settings("robust", script)["flat_w"]) == (1.0, 1.0)
    module = __import__(script)
    for recipe, expected in (("original", 0.0), ("robust", 1.0)):
        _, args, _ = module.parse(["--run_name", "r", "--recipe", recipe])
        assert (args.jnd, args.flat_w) == (expected, expected)
    _, args, _ = module.parse(["--run_name", "r", "--recipe", "robust", "--jnd", "2", "--flat_w", "0"])
    assert (args.jnd, args.flat_w) == (2.0, 0.0)


def test_the_help_shows_every_recipes_values(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--jnd STRENGTH", "--flat_w FLAT_W"):
        start = text.index(flag, text.index("options:") if "options:" in text else 0)
        assert "[original: 0.0; robust: 1.0; robust_v1: 0.0]" in text[start:start + 700], flag


# ------------------------------------------------------------------------------------------------ training
def test_a_tiny_robust_run_trains_with_both_and_exports_a_shaped_encoder(tmp_path, photo_folder, capsys):
    train.main(["--run_name", "shaped", "--results_dir", str(tmp_path), *TINY, "--max_step", "3",
                "--train_path", str(photo_folder)])
    encoder, _, config = load_pretrained(tmp_path / "shaped" / "model")
    assert encoder.config.jnd == 1.0 and config["encoder"]["jnd"] == 1.0
    assert "loss/L_flat" in tensorboard_tags(tmp_path / "shaped" / "tb")
    args = json.loads((tmp_path / "shaped" / "args.json").read_text())
    assert (args["jnd"], args["flat_w"]) == (1.0, 1.0)

    # without shaping: no L_flat, an unshaped encoder; fine-tuned from it with --init_from, the recipe's --jnd
    train.main(["--run_name", "plain", "--results_dir", str(tmp_path), *TINY, "--max_step", "1",
                "--train_path", str(photo_folder), "--jnd", "0", "--flat_w", "0"])
    assert load_pretrained(tmp_path / "plain" / "model")[0].config.jnd == 0.0
    assert "loss/L_flat" not in tensorboard_tags(tmp_path / "plain" / "tb")
    capsys.readouterr()
    train.main(["--run_name", "tuned", "--results_dir", str(tmp_path), *TINY, "--max_step", "1",
                "--train_path", str(photo_folder), "--init_from", str(tmp_path / "plain"), "--jnd", "2"])
    assert "--jnd 2.0 replaces its perceptual shaping (0.0)" in capsys.readouterr().out
    assert load_pretrained(tmp_path / "tuned" / "model")[0].config.jnd == 2.0


def test_a_resumed_run_names_the_flags_its_checkpoint_did_not_have(tmp_path, photo_folder, capsys):
    """A checkpoint written before --flat_w existed: resumed, the recipe's flat_w applies from then on, and the
    run says so; the encoder keeps its saved (unshaped) config."""
    flags = ["--run_name", "old", "--results_dir", str(tmp_path), *TINY, "--train_path", str(photo_folder),
             "--jnd", "0", "--flat_w", "0"]
    train.main([*flags, "--max_step", "3"])
    path = tmp_path / "old" / "checkpoints" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    for key in ("jnd", "flat_w"):
        del checkpoint["args"][key]
    del checkpoint["encoder_config"]["jnd"]
    torch.save(checkpoint, path)
    capsys.readouterr()
    train.main(["--run_name", "old", "--results_dir", str(tmp_path), *TINY, "--train_path", str(photo_folder),
                "--max_step", "4"])
    out = capsys.readouterr().out
    assert "flags newer than the checkpoint apply from step 3: --flat_w 1.0, --jnd 1.0" in out
    assert "jnd 0.0" in out and load_pretrained(tmp_path / "old" / "model")[0].config.jnd == 0.0
