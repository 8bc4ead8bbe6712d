"""augment/resample.py (--aug_resample): Pillow's filters, stamp.py's round trip, the size grid, gradients, the views,
the recipes, and a tiny train_rs_aug.py run through it."""
import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import train
import train_rs_aug
from augment import StochasticChain, build, parse_names
from augment.forwarding import Downscale, Resample
from augment.resample import (FACTORS, FILTERS, MAX_FILE, PHOTO_SIZES, PlatformResampling, _resample_axis,
                              pillow_weights, quantise, resize)
from augment.view import augmented_noisy_view, augmented_view
from conftest import TINY_TRAIN_FLAGS as TINY, tensorboard_tags
from product.files import pixels_to_tensor
from product.stamping import stamp_pixels, to_working

PILLOW = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
          "lanczos": Image.Resampling.LANCZOS}


def _coffee(h=120, w=160):
    """A real photo (scikit-image's coffee.png), cropped to (h, w): (H,W,3) uint8."""
    return np.ascontiguousarray(skimage.data.coffee()[100:100 + h, 200:200 + w])


def _levels(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


def _as_pixels(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------ Pillow's filters

@pytest.mark.parametrize("factor", [0.4, 0.75, 1.25, 2.0])
@pytest.mark.parametrize("filter", FILTERS)
def test_each_filter_is_pillows_within_two_levels_on_a_real_photo(filter, factor):
    """Measured on four scikit-image photos at ×0.4–2: at most 2 levels off Pillow's 8-bit result (its fixed-point
    weights), on average under 0.04 levels; area (BOX) exactly. torch's own antialiased bicubic was up to 14 levels
    off (it does not clip between its passes), and there is no Lanczos in torch or kornia."""
    pixels = _coffee()
    h, w = round(120 * factor), round(160 * factor)
    ours = _as_pixels(resize(_levels(pixels), (h, w), filter)).astype(int)
    pillow = np.asarray(Image.fromarray(pixels).resize((w, h), PILLOW[filter])).astype(int)
    difference = np.abs(ours - pillow)
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_lanczos_is_not_bicubic():
    """Why Lanczos is written here rather than left to bicubic: Pillow's LANCZOS and BICUBIC differ by more than a
    level on 10-13% of the pixels of real photos (measured at ×0.4-2), far more than our Lanczos differs from it."""
    pixels = _coffee()
    lanczos = np.asarray(Image.fromarray(pixels).resize((120, 90), Image.Resampling.LANCZOS)).astype(int)
    bicubic = _as_pixels(resize(_levels(pixels), (90, 120), "bicubic")).astype(int)
    ours = _as_pixels(resize(_levels(pixels), (90, 120), "lanczos")).astype(int)
    assert (np.abs(bicubic - lanczos) > 1).mean() > 0.05
    assert (np.abs(ours - lanczos) > 1).mean() == 0


@pytest.mark.parametrize("filter", FILTERS)
def test_weights_are_normalised_bands_widened_when_shrinking(filter):
    taps = {"area": 0.5, "bilinear": 1, "bicubic": 2, "lanczos": 3}[filter]
    for n_in, n_out in [(100, 40), (40, 100), (37, 37 * 2)]:
        weights = pillow_weights(n_in, n_out, filter, dtype=torch.float64)
        assert weights.shape == (n_out, n_in)
        assert torch.allclose(weights.sum(1), torch.ones(n_out, dtype=torch.float64))
        reach = taps * max(n_in / n_out, 1)  # each output reads at most 2·reach + 1 inputs
        assert ((weights != 0).sum(1) <= 2 * reach + 1).all() and ((weights != 0).sum(1) >= 1).all()


def test_the_banded_product_and_its_gradient_equal_the_dense_matrix():
    """_resample_axis works block by block over the band with its own backward: the same values and gradient as the
    full matrix product, across several blocks (150 outputs)."""
    x = torch.rand(2, 3, 260, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(150, 7, dtype=torch.float64)
    for filter in FILTERS:
        y = _resample_axis(x, 150, filter)
        dense = pillow_weights(260, 150, filter, dtype=torch.float64) @ x
        assert torch.allclose(y, dense, atol=1e-12)
        (gradient,) = torch.autograd.grad((y * weights).sum(), x)
        (expected,) = torch.autograd.grad((dense * weights).sum(), x)
        assert torch.allclose(gradient, expected, atol=1e-12)


def test_quantise_rounds_to_8_bits_and_passes_the_gradient_straight_through():
    x = (torch.tensor([-25.0, 0.0, 0.5, 1.5, 76.6, 300.0], dtype=torch.float64) / 255).requires_grad_()
    y = quantise(x)
    levels = torch.tensor([0.0, 0.0, 0.0, 2.0, 77.0, 255.0], dtype=torch.float64)  # clipped; halves to even
    assert torch.allclose(y * 255, levels, atol=1e-9)
    levels[2] = 1.0  # Pillow's halves go up
    assert torch.allclose(quantise(x, half_up=True) * 255, levels, atol=1e-9)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(6, dtype=torch.float64))


# ------------------------------------------------------------------------------- stamp.py's round trip

class _ConstantResidual(torch.nn.Module):
    """An encoder stand-in whose residual does not depend on the photo, so that stamp.py's residual (made from the
    photo brought to the working size) and the training crop's are the same δ."""

    def __init__(self, residual):
        super().__init__()
        self.residual = torch.nn.Parameter(residual)

    def forward(self, x):
        return self.residual.expand(x.shape[0], -1, -1, -1)


def _stamp_py_case(k: int, seed: int = 0):
    """(crop x at the working size, stamped crop x + δ, the k× photo P as uint8, the stub encoder): x is on levels
    k²·m/255 so that its bilinear k× upsampling is whole 8-bit levels, P = 255·up(x) exactly, the photo that the
    training's round trip stands in for."""
    generator = torch.Generator().manual_seed(seed)
    levels = {2: 16, 4: 64}[k]  # bilinear ×2 weighs in 16ths, ×4 in 64ths
    m = torch.randint(1, 255 // levels, (1, 3, 24, 32), generator=generator)
    x = levels * m.float() / 255
    residual = (0.02 * torch.randn(1, 3, 24, 32, generator=generator)).clamp(-0.05, 0.05)
    up = torch.nn.functional.interpolate(x, size=(24 * k, 32 * k), mode="bilinear", align_corners=False)
    photo = (up * 255).round()
    assert (up * 255 - photo).abs().max() < 1e-4  # whole levels: P is the photo up(x)
    return x, x + residual, photo[0].permute(1, 2, 0).to(torch.uint8).numpy(), _ConstantResidual(residual)


@pytest.mark.parametrize("k", [2, 4])
def test_the_round_trip_is_stamp_pys_then_scan_pys_own_computation(k):
    """A photo of k× the working size (32 px): stamp.py's stamp_pixels (residual at the working size, upsampled,
    added, 8-bit file) then scan.py's to_working give, within 1e-6, what PlatformResampling.apply(photo size k, no
    platform resampling) makes of the crop's pair [x, x + δ]: clean and stamped alike."""
    x, stamped, photo, encoder = _stamp_py_case(k)
    file, working = stamp_pixels(encoder, photo, working_size=32)
    assert working == (24, 32) and file.shape == (24 * k, 32 * k, 3)
    scanned_stamped = to_working(pixels_to_tensor(file, "cpu"), 32)
    scanned_clean = to_working(pixels_to_tensor(photo, "cpu"), 32)
    clean, ours = PlatformResampling.apply(torch.cat([x, stamped]), k, 1.0, "lanczos").chunk(2)
    assert ours.shape == scanned_stamped.shape == (1, 3, 24, 32)
    assert (ours - scanned_stamped).abs().max() < 1e-6
    assert (clean - scanned_clean).abs().max() < 1e-6
    assert (ours - clean).abs().mean() > 1e-3  # the stamp is there


@pytest.mark.parametrize("k, step, factor, filter", [
    (2, Downscale(0.75), 0.75, "lanczos"),  # a 2× photo downscaled by a platform (product.pipelines' Downscale)
    (4, Downscale(0.5), 0.5, "lanczos"),
    (1, Resample(1.25), 1.25, "bilinear"),  # a screenshot at ×1.25 of a photo at the working size
])
def test_the_round_trip_through_a_platforms_resampling_is_the_product_stages(k, step, factor, filter):
    """stamp.py, then the product stage's own Pillow step (augment.forwarding), then scan.py's to_working, against
    PlatformResampling.apply: within Pillow's fixed-point rounding (≤ 2/255 anywhere, ~0 on average)."""
    x, stamped, photo, encoder = _stamp_py_case(max(k, 2))
    if k == 1:
        photo = _as_pixels(x)  # the photo is the crop itself: stamped at its own size
    file = stamp_pixels(encoder, photo, working_size=32)[0]
    scanned = to_working(pixels_to_tensor(step(file), "cpu"), 32)
    ours = PlatformResampling.apply(stamped, k, factor, filter)
    assert ours.shape == scanned.shape
    difference = (ours - scanned).abs()
    assert difference.max() <= 2 / 255 + 1e-6 and difference.mean() < 0.1 / 255, (difference.max(), difference.mean())


# --------------------------------------------------------------------------------- sizes, draws, gradients

def test_the_scanner_reads_one_of_a_few_sizes_and_every_one_is_drawn():
    """One size per batch from the grid of factors × photo sizes: at most 10 shapes (cuDNN autotunes each once),
    from 0.4× to 2× the crop; the platform's file never exceeds MAX_FILE× the crop."""
    resample = PlatformResampling()
    assert resample.output_sides(400) == [160, 200, 240, 300, 320, 360, 400, 500, 600, 800]
    pair = torch.rand(2, 3, 40, 40)
    torch.manual_seed(0)
    draws = [resample.draw() for _ in range(600)]
    assert {d[0] for d in draws} == set(PHOTO_SIZES) and {d[2] for d in draws} == set(FILTERS)
    assert {d[1] for d in draws} == set(FACTORS) and all(p * f <= MAX_FILE for p, f, _ in draws)
    sides = {PlatformResampling.apply(pair, *d).shape[-1] for d in set(draws)}
    assert sides == set(resample.output_sides(40)) and len(sides) <= 10
    torch.manual_seed(3)
    first = [resample.draw() for _ in range(5)]
    torch.manual_seed(3)
    assert [resample.draw() for _ in range(5)] == first  # torch's generator: repeatable, and a checkpoint restores it


@pytest.mark.parametrize("setting", [(1.0, 0.4, "area"), (1.0, 0.75, "bicubic"), (0.5, 2.0, "lanczos"),
                                     (1.0, 1.5, "bilinear"), (2.0, 1.0, "bilinear"), (4.0, 0.6, "lanczos")])
def test_gradients_reach_the_stamped_input_and_values_stay_in_0_1(setting):
    stamped = (torch.rand(2, 3, 29, 35) * 1.1 - 0.05).clamp(0, 1).requires_grad_()
    y = PlatformResampling.apply(stamped, *setting)
    assert 0 <= y.min() and y.max() <= 1 and y.shape[:2] == (2, 3)
    (y * torch.rand_like(y)).sum().backward()
    assert torch.isfinite(stamped.grad).all() and (stamped.grad != 0).float().mean() > 0.9


def test_resampling_makes_no_host_device_synchronisation():
    """Every size is computed on the host from Python numbers, every weight from device arithmetic, every draw from
    torch's CPU generator: a CUDA step is not made to wait (engine.hostsync's CPU simulation)."""
    from engine.hostsync import HostSyncCounter
    x = torch.rand(2, 3, 24, 24, requires_grad=True)
    with HostSyncCounter("cpu") as counter:
        for setting in [(1.0, 0.75, f) for f in FILTERS] + [(0.5, 2.0, "lanczos"), (4.0, 0.5, "bicubic")]:
            PlatformResampling.apply(x, *setting).sum().backward()
        for seed in range(8):
            torch.manual_seed(seed)
            PlatformResampling()(x).sum().backward()
    assert counter.total == 0, counter.report()


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown resampling filter 'nearest'"):
        PlatformResampling(filters=("nearest",))
    with pytest.raises(ValueError, match="unknown resampling filter 'nearest'"):
        resize(torch.rand(1, 3, 8, 8), (4, 4), "nearest")
    with pytest.raises(ValueError, match="factors must be positive"):
        PlatformResampling(factors=(0.0, 1.0))


# ------------------------------------------------------------------------------------- the views, the flags

class _RecordingChain:
    def __init__(self):
        self.calls = []

    def __call__(self, x, strength=None):
        self.calls.append(x.clone())
        return x


def test_the_views_resample_the_whole_pair_once_per_batch_before_the_chain():
    pair = torch.rand(4, 3, 40, 40)
    for seed in range(6):
        torch.manual_seed(seed)
        expected = PlatformResampling.apply(pair, *PlatformResampling().draw())
        chain = _RecordingChain()
        torch.manual_seed(seed)
        (v,) = augmented_noisy_view(chain, std=0.0, aug_start=0, aug_end=0, resample=True)(pair, 1)
        assert torch.equal(chain.calls[0], expected) and torch.equal(v.images, expected)
        chain = _RecordingChain()
        torch.manual_seed(seed)
        augmented_view(chain, resample=True)(pair, 0)  # train.py --aug: resampled together, then split
        assert torch.equal(torch.cat(chain.calls), expected) and [c.shape[0] for c in chain.calls] == [2, 2]
    chain = _RecordingChain()
    augmented_noisy_view(chain, std=0.0, aug_start=0, aug_end=0)(pair, 1)  # off: the pair as it is
    assert torch.equal(chain.calls[0], pair)


@pytest.mark.parametrize("script", [train, train_rs_aug])
def test_robust_resamples_and_shifts_original_does_neither(script):
    """--aug_resample and the chain's 'shift' are the robust recipe's; the original recipe's chain is the original
    code's fixed one and its pair is not resampled, so its views are what they were."""
    aug = ["--aug"] if script is train else []
    _, robust, _ = script.parse(["--run_name", "r", "--recipe", "robust", *aug])
    _, original, views = script.parse(["--run_name", "r", "--recipe", "original", *aug, "--aug_start", "0",
                                       "--aug_end", "0"] if script is train_rs_aug else ["--run_name", "r", *aug])
    assert robust.aug_resample is True and original.aug_resample is False
    from engine.recipes import settings
    name = "train" if script is train else "train_rs_aug"
    assert (settings("original", name)["aug_resample"], settings("robust", name)["aug_resample"]) == (False, True)
    from augment.original import FixedOrderChain
    from augment.view import augmentation_chain
    assert "shift" in parse_names(robust.augs) and "codec" not in parse_names(robust.augs)
    assert isinstance(augmentation_chain(original, "plain_da" if script is train else "rs_aug"), FixedOrderChain)
    pair = torch.rand(4, 3, 48, 48)
    assert all(v.images.shape == pair.shape for _ in range(10) for v in views(pair, 1))  # never resampled


def test_the_flags_help_shows_both_recipes():
    from engine.cli import add_aug_flags, build_parser
    parser = build_parser("x", "train_rs_aug")
    add_aug_flags(parser, parser.add_argument_group("aug"))
    text = " ".join(parser.format_help().split())
    assert "--aug_resample" in text and "[original: False; robust: True; robust_v1: False]" in text
    assert "'all' (every one but codec" in text


def test_shift_moves_whole_pixels_exactly_and_fractions_by_interpolation():
    """The chain's 'shift': an integer shift moves the pixels (no resampling), half a pixel averages neighbours."""
    import kornia
    x = torch.rand(1, 3, 20, 24)
    moved = kornia.geometry.transform.translate(x, torch.tensor([[3.0, 2.0]]), padding_mode="reflection",
                                                align_corners=True)
    assert (moved[..., 2:, 3:] - x[..., :-2, :-3]).abs().max() < 1e-5
    shift = build("shift", pixels=(3, 3))
    torch.manual_seed(0)
    y = shift(x, 0.5)  # 1.5 px in x and y, sign drawn
    assert not torch.equal(y, x) and (y - x).abs().mean() > 1e-3
    assert shift.pixels == (3.0, 3.0) and build("shift").pixels == (0.0, 16.0)


def test_codec_is_pillows_jpeg_or_webp_with_an_identity_gradient():
    from augment.corruptions import encode_decode, to_pixels
    x = _levels(_coffee(48, 64)).requires_grad_()
    for fmt, options in [("jpeg", {}), ("webp", {"lossless": False})]:
        y = build("codec", quality=(60, 60), formats=(fmt,))(x)
        expected = encode_decode(to_pixels(x[0]), fmt.upper(), quality=60, **options)
        assert np.array_equal(_as_pixels(y.detach()), expected)
        x.grad = None
        y.sum().backward()
        inside = (y > 0) & (y < 1)
        assert torch.equal(x.grad[inside], torch.ones_like(x)[inside])
    with pytest.raises(ValueError, match="codec formats"):
        build("codec", formats=("png",))
    assert "codec" not in parse_names("all") and parse_names("codec,jpeg") == ["codec", "jpeg"]
    assert isinstance(StochasticChain.from_names("shift,codec"), StochasticChain)


# ---------------------------------------------------------------------------------------- a tiny run

@pytest.mark.end_to_end
def test_train_rs_aug_trains_through_resampling_shift_and_a_real_codec(tmp_path, photo_folder):
    summary = train_rs_aug.main(["--run_name", "rs", "--results_dir", str(tmp_path), "--max_step", "3", "--std",
                                 "0.25", "--aug_start", "0", "--aug_end", "1", "--augs", "shift,codec,jpeg",
                                 "--aug_prob", "1", "--train_path", str(photo_folder), *TINY])
    run_dir = tmp_path / "rs"
    args = json.loads((run_dir / "args.json").read_text())
    assert args["aug_resample"] is True and args["augs"] == "shift,codec,jpeg"
    assert {"acc/aug", "L_A/aug", "val/acc/aug"} <= tensorboard_tags(run_dir / "tb")
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert "acc/aug" in summary["test_crops"]
