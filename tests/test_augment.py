"""augment/: every corruption's contract, real vs differentiable JPEG, the chain, its view, train_rs_aug.py."""
import io
import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

import train_rs_aug
from augment import benchmark, gallery
from augment import CORRUPTIONS, JPEG, PRESETS, DownUpResize, StochasticChain, build, parse_names, pillow_jpeg
from augment.view import augmented_noisy_view
from engine.training import ramp
from conftest import TINY_TRAIN_FLAGS as TINY, tensorboard_tags

ALL = list(CORRUPTIONS)


def _photo(h=37, w=53, batch=2, dtype=torch.float32, top=100):
    """Crops of a real photo (scikit-image's astronaut) at an odd size."""
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).to(dtype) / 255
    return torch.stack([image[:, top + 31 * i:top + 31 * i + h, 180:180 + w] for i in range(batch)])


# ------------------------------------------------------------------------------------- every corruption

@pytest.mark.parametrize("preset", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_and_range_are_kept_on_odd_sizes(name, dtype, preset):
    x = _photo(dtype=dtype)
    y = build(name, preset)(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert 0 <= y.min() and y.max() <= 1
    assert (y - x).abs().mean() > 1e-3  # it did something


@pytest.mark.parametrize("name", ALL)
def test_gradient_is_finite_and_non_zero(name):
    x = _photo().requires_grad_()
    (build(name, "train")(x) * torch.linspace(0, 1, 53)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_a_fixed_strength_and_seed_give_the_same_output(name):
    x, corruption = _photo(), build(name, "eval")
    torch.manual_seed(3)
    a = corruption(x, 0.7)
    torch.manual_seed(3)
    b = corruption(x, 0.7)
    torch.manual_seed(4)
    c = corruption(x, 0.7)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ALL)
def test_strength_zero_is_the_identity_and_the_change_grows_with_strength(name):
    x, corruption = _photo(batch=4), build(name, "train")
    assert torch.equal(corruption(x, 0.0), x)
    changes = []
    for s in (0.5, 1.0):
        torch.manual_seed(0)
        changes.append((corruption(x, s) - x).abs().mean().item())
    assert 0 < changes[0] < changes[1]
    # per sample: strength 0 leaves exactly that sample alone
    y = corruption(x, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2]) and not torch.equal(y[1], x[1])


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_strength_scales_the_drawn_parameter_from_the_identity(strength):
    """The contract, exactly, on two corruptions: parameter = identity + s·(U(lo, hi) − identity). Noise: σ = s·U(std)
    per sample (identity 0); rotation: angle = s·(±U(degrees)) per sample. Replayed from the same seeded draws."""
    import kornia
    x = _photo(batch=4)
    noise = build("noise", "train", std=(0.02, 0.1))
    torch.manual_seed(0)
    got = noise(x, strength)
    torch.manual_seed(0)
    std = strength * (0.02 + 0.08 * torch.rand(4))
    assert torch.equal(got, (x + std.view(-1, 1, 1, 1) * torch.randn_like(x)).clamp(0, 1))
    rotation = build("rotation", "train", degrees=(10, 30))
    torch.manual_seed(1)
    got = rotation(x, strength)
    torch.manual_seed(1)
    sign = (torch.rand(4) < 0.5).float() * 2 - 1
    angle = strength * sign * (10 + 20 * torch.rand(4))
    assert torch.allclose(got, kornia.geometry.transform.rotate(x, angle).clamp(0, 1), atol=1e-6)
    assert sign.unique().numel() == 2  # both directions drawn


@pytest.mark.parametrize("name", ALL)
def test_repr_names_the_ranges(name):
    text = repr(build(name, "train"))
    assert text.startswith(type(build(name)).__name__ + "(") and "=" in text


def test_hue_shift_rotates_chroma_keeps_luma_and_has_finite_gradients():
    """Hue is a rotation of YUV's chroma plane (kornia's HSV hue has NaN gradients near grey: see ColorJitter)."""
    from kornia.color import rgb_to_yuv
    from augment import ColorJitter
    x = _photo(batch=3).requires_grad_()
    angle = torch.tensor([0.0, 1.0, -2.0])
    y = ColorJitter._rotate_hue(x, angle)
    assert torch.allclose(y[0], x[0], atol=1e-6)  # angle 0: the identity
    yuv_x, yuv_y = rgb_to_yuv(x), rgb_to_yuv(y)
    assert torch.allclose(yuv_y[:, 0], yuv_x[:, 0], atol=1e-5)  # luma kept
    assert torch.allclose(yuv_y[:, 1:].norm(dim=1), yuv_x[:, 1:].norm(dim=1), atol=1e-5)  # chroma length kept
    assert not torch.allclose(yuv_y[1, 1:], yuv_x[1, 1:], atol=1e-3)  # and turned
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_strength_and_input_are_refused():
    rotation = build("rotation")
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\]"):
        rotation(_photo(), 1.5)
    with pytest.raises(ValueError, match="strength must be a number or a"):
        rotation(_photo(), torch.ones(3))
    with pytest.raises(ValueError, match="float"):
        rotation(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="degrees must be a range"):
        build("rotation", degrees=(30, 10))
    with pytest.raises(ValueError, match="mode"):
        JPEG(mode="fast")


def test_parameters_are_drawn_per_sample():
    x = _photo(batch=1).expand(6, -1, -1, -1)
    for name in ALL:
        y = build(name, "train")(x)
        # (a disk kernel changes only when its radius crosses a pixel distance, so compare six samples)
        assert any(not torch.equal(y[0], y[i]) for i in range(1, 6)), name


# ------------------------------------------------------------------------------------------ JPEG

@pytest.mark.parametrize("quality", [50, 75, 90])
def test_differentiable_jpeg_is_within_35_db_of_pillow(quality):
    x = _photo(h=96, w=128, batch=2)
    q = torch.full((2,), float(quality))
    real = JPEG(quality=(quality, quality), mode="real")(x)
    differentiable = JPEG(quality=(quality, quality))(x)
    assert torch.equal(real, pillow_jpeg(x, q))
    assert peak_signal_noise_ratio(differentiable, real, data_range=1.0) >= 35
    assert peak_signal_noise_ratio(real, x, data_range=1.0) < 45  # it did compress


def test_real_jpeg_is_pillows_codec_with_an_identity_gradient():
    x = _photo(batch=1)
    pixels = (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=60)
    expected = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float() / 255
    x.requires_grad_()
    y = JPEG(quality=(60, 60), mode="real")(x)
    assert torch.equal(y[0].detach(), expected)
    y.sum().backward()
    inside = (y > 0) & (y < 1)  # the final clamp to [0,1] may stop the gradient at the ends
    assert inside.float().mean() > 0.99 and torch.equal(x.grad[inside], torch.ones_like(x)[inside])


def test_down_up_resize_at_half_size_matches_pillow_closely():
    x = _photo(h=96, w=128, batch=1)
    ours = DownUpResize(scale=(0.5, 0.5))(x)
    pil = Image.fromarray((x[0] * 255).round().byte().permute(1, 2, 0).numpy())
    pil = pil.resize((64, 48), Image.BILINEAR).resize((128, 96), Image.BILINEAR)
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    assert peak_signal_noise_ratio(ours, reference, data_range=1.0) > 30


# ------------------------------------------------------------------------------------ registry, chain

def test_registry_names_presets_and_errors():
    assert parse_names("all") == [n for n in ALL if n != "codec"]  # the real codec only when named (augment.OPT_IN)
    assert parse_names(" jpeg, rotation ") == ["jpeg", "rotation"]
    with pytest.raises(ValueError, match="unknown corruption 'blurr'"):
        parse_names("jpeg,blurr")
    with pytest.raises(ValueError, match="twice"):
        parse_names("jpeg,jpeg")
    with pytest.raises(ValueError, match="unknown preset"):
        build("jpeg", "hard")
    assert set(PRESETS["train"]) == set(PRESETS["eval"]) == set(ALL)
    assert build("jpeg", "eval").mode == "real" and build("jpeg").mode == "differentiable"
    assert build("rotation", degrees=(0, 5)).degrees == (0.0, 5.0)
    # the paper's training ranges are covered
    train = {n: build(n) for n in ALL}
    assert train["crop"].scale[0] <= 0.7 and train["rotation"].degrees[1] >= 30
    assert min(train["jitter"].brightness, train["jitter"].contrast, train["jitter"].saturation) >= 0.3
    assert train["gaussian_blur"].kernel_size == (3, 7) and train["gaussian_blur"].sigma == (1.0, 3.0)
    assert train["perspective"].distortion[1] >= 0.1 and train["jpeg"].quality[0] <= 50


def test_the_training_and_evaluation_ranges_are_the_documented_ones():
    """Every range of both presets, value by value (augment/registry.py's comment gives the paper's training
    ranges they cover, and the paper code's validation chain the evaluation ones follow): a changed constant
    changes what the scanner is trained and judged on."""
    assert PRESETS == {
        "train": {
            "rotation": dict(degrees=(0, 30)), "crop": dict(scale=(0.7, 1.0)),
            "jitter": dict(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
            "gaussian_blur": dict(kernel_size=(3, 7), sigma=(1.0, 3.0)),
            "defocus": dict(radius=(1.0, 3.0), alias_blur=0.5), "perspective": dict(distortion=(0.0, 0.1)),
            "noise": dict(std=(0.01, 0.05)), "resize": dict(scale=(0.5, 1.0)),
            "jpeg": dict(quality=(50, 100), mode="differentiable"), "shift": dict(pixels=(0.0, 16.0)),
            "codec": dict(quality=(50, 95), formats=("jpeg", "webp")),
        },
        "eval": {
            "rotation": dict(degrees=(0, 45)), "crop": dict(scale=(0.4, 1.0)),
            "jitter": dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4),
            "gaussian_blur": dict(kernel_size=(3, 9), sigma=(1.0, 4.0)),
            "defocus": dict(radius=(3.0, 6.0), alias_blur=0.5), "perspective": dict(distortion=(0.0, 0.4)),
            "noise": dict(std=(0.02, 0.1)), "resize": dict(scale=(0.25, 1.0)),
            "jpeg": dict(quality=(30, 90), mode="real"), "shift": dict(pixels=(0.0, 32.0)),
            "codec": dict(quality=(30, 90), formats=("jpeg", "webp")),
        },
    }


def test_chain_draws_per_sample_subsets_and_strengths():
    torch.manual_seed(0)
    x = _photo(batch=1).expand(16, -1, -1, -1)
    y = StochasticChain.from_names("all", p=0.5)(x)
    changed = [(y[i] - x[i]).abs().mean().item() for i in range(16)]
    assert len({round(c, 6) for c in changed}) == 16  # every sample got its own corruption
    assert torch.equal(StochasticChain.from_names("all")(x, 0.0), x)
    y = StochasticChain.from_names("noise", p=0.5)(x)
    untouched = sum(torch.equal(y[i], x[i]) for i in range(16))
    assert 2 <= untouched <= 14  # each sample skips a corruption with probability 1 - p


def test_chain_order_is_drawn_per_batch():
    """Two deterministic corruptions that do not commute: both orders occur, and nothing else."""
    x = _photo(batch=1)
    resize, jpeg = DownUpResize(scale=(0.5, 0.5)), JPEG(quality=(40, 40), mode="real")
    orders = {"resize, jpeg": jpeg(resize(x)), "jpeg, resize": resize(jpeg(x))}
    chain = StochasticChain([resize, jpeg], p=1.0)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        y = chain(x)
        seen |= {k for k, v in orders.items() if torch.equal(y, v)}
    assert seen == set(orders)


def test_chain_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        StochasticChain.from_names("jpeg", p=0)
    with pytest.raises(ValueError, match="at least one"):
        StochasticChain([])


def test_ramp_and_the_augmented_view():
    assert [ramp(s, 10, 20) for s in (0, 9, 10, 15, 20, 99)] == [0, 0, 0, 0.5, 1, 1]
    assert ramp(5, 5, 5) == 1.0 and ramp(4, 5, 5) == 0.0
    # the original's slope: clip(aug_w·(step − start)/(end − start), 0, 1)
    assert [ramp(s, 10, 20, slope=2.0) for s in (10, 12, 15, 99)] == [0, 0.4, 1, 1]
    assert [ramp(s, 10, 20, slope=0.5) for s in (20, 30, 40)] == [0.5, 1, 1]
    view = augmented_noisy_view(StochasticChain.from_names("rotation", p=1.0), std=0.5, aug_start=10, aug_end=20)
    pair = _photo(batch=4)
    assert view(pair, 5) == []
    (v,) = view(pair, 15)
    assert v.name == "aug" and v.weight == 0.5 and v.images.shape == pair.shape
    assert v.images.min() < 0 or v.images.max() > 1  # the smoothing noise is not clamped
    assert 0.4 < (v.images - pair).std() < 0.6


class _RecordingChain:
    """A deterministic stand-in for a chain: records each call's batch and strength; pushes values out of [0,1] so
    that the view's clamp shows."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, strength=None):
        self.calls.append((x.clone(), strength))
        return 1.5 * x - 0.2


@pytest.mark.parametrize("strength_ramp", [True, False])
def test_the_augmented_noisy_view_follows_its_ramp_exactly(strength_ramp):
    """L_A^DA's view at step s: weight w = clip(aug_w·(s − start)/(end − start), 0, 1), images
    clamp(chain(pair, strength)) + std·N(0, 1) drawn from torch's generator, strength w with the strength ramp
    and None (full) without; nothing (and no chain call) while w = 0."""
    pair = _photo(batch=4)
    for step, weight in {0: 0.0, 10: 0.0, 15: 0.5, 17: 0.7, 20: 1.0, 99: 1.0}.items():
        chain = _RecordingChain()
        view = augmented_noisy_view(chain, std=0.3, aug_start=10, aug_end=30, aug_w=2.0, strength_ramp=strength_ramp)
        torch.manual_seed(step)
        views = view(pair, step)
        if weight == 0:
            assert views == [] and chain.calls == []
            continue
        (v,) = views
        torch.manual_seed(step)
        expected = (1.5 * pair - 0.2).clamp(0, 1)
        expected = expected + 0.3 * torch.randn_like(expected)
        assert v.name == "aug" and v.weight == pytest.approx(weight, abs=1e-12) and torch.equal(v.images, expected)
        ((seen, strength),) = chain.calls
        assert torch.equal(seen, pair)
        assert strength == (pytest.approx(weight, abs=1e-12) if strength_ramp else None)


def test_plain_da_corrupts_the_clean_and_the_stamped_halves_in_separate_calls():
    """train.py --aug: [chain(x), chain(x')] at full strength, each half its own call (the original chain draws
    its parameters once per call), with weight rs_w."""
    from augment.view import augmented_view
    pair = _photo(batch=4)
    chain = _RecordingChain()
    (v,) = augmented_view(chain, weight=2.0)(pair, 0)
    assert v.name == "aug" and v.weight == 2.0 and torch.equal(v.images, 1.5 * pair - 0.2)
    assert [(x.shape[0], strength) for x, strength in chain.calls] == [(2, None), (2, None)]
    assert torch.equal(chain.calls[0][0], pair[:2]) and torch.equal(chain.calls[1][0], pair[2:])


def test_aug_downscale_shrinks_the_pair_once_per_batch_before_the_chain():
    """--aug_downscale 0.5: the chain receives the whole pair shrunk by one factor f per batch (kornia's antialiased
    rescale, not scaled back), f drawn from torch's generator uniformly over the grid of DOWNSCALE_STEPS values from
    0.5 to 1 (f = 1: the pair as it is); the plain-DA view splits that same shrunk pair."""
    import kornia
    from augment.view import DOWNSCALE_STEPS, augmented_view, downscale_factors
    grid = downscale_factors(0.5)
    assert len(grid) == DOWNSCALE_STEPS == 8 and grid[0] == 0.5 and grid[-1] == 1.0
    assert grid == pytest.approx([0.5 + 0.5 * k / 7 for k in range(8)]) and grid == sorted(grid)
    pair = _photo(h=64, w=96, batch=4)
    sizes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        factor = grid[int(float(torch.rand(())) * 8)]
        expected = pair if factor == 1 else kornia.geometry.transform.rescale(pair, factor, antialias=True)
        chain = _RecordingChain()
        torch.manual_seed(seed)
        (v,) = augmented_noisy_view(chain, std=0.0, aug_start=0, aug_end=0, downscale=0.5)(pair, 1)
        ((seen, _),) = chain.calls
        assert torch.equal(seen, expected) and v.images.shape == expected.shape
        assert 32 <= seen.shape[-2] <= 64 and abs(seen.shape[-1] - 96 * factor) <= 1
        sizes.add(seen.shape[-2])
        chain = _RecordingChain()
        torch.manual_seed(seed)
        augmented_view(chain, downscale=0.5)(pair, 0)
        assert torch.equal(torch.cat([x for x, _ in chain.calls]), expected)
    assert len(sizes) > 1  # a new factor every batch
    chain = _RecordingChain()
    augmented_noisy_view(chain, std=0.0, aug_start=0, aug_end=0)(pair, 1)  # default: off, the pair as it is
    assert torch.equal(chain.calls[0][0], pair)
    _, args, views = train_rs_aug.parse(["--run_name", "r", "--recipe", "robust", "--aug_downscale", "0.6",
                                         "--aug_start", "0", "--aug_end", "0", "--aug_resample", "off"])
    assert args.aug_downscale == 0.6
    torch.manual_seed(0)
    widths = {views(pair, 1)[-1].images.shape[-1] for _ in range(8)}  # the grid's top value (1) leaves it at 96
    assert min(widths) < 96 and min(widths) >= int(96 * 0.6)


@pytest.mark.parametrize("smallest", [0.3, 0.6, 0.95])
def test_aug_downscale_gives_at_most_the_grid_size_of_shapes_over_many_batches(smallest):
    """The factor comes from a grid, so over many batches the shrunk pair takes at most DOWNSCALE_STEPS shapes
    (cuDNN autotunes each new shape: a continuous U(SMALLEST, 1) gave a new one nearly every batch at 400²), and
    every grid value is drawn."""
    from augment.view import DOWNSCALE_STEPS, random_downscale
    pair = torch.zeros(2, 3, 400, 400)
    torch.manual_seed(0)
    shapes = [random_downscale(pair, smallest).shape for _ in range(300)]
    assert len(set(shapes)) == DOWNSCALE_STEPS
    assert all(s[:2] == (2, 3) and int(400 * smallest) <= s[-1] <= 400 for s in shapes)
    assert (2, 3, 400, 400) in shapes and (2, 3, int(400 * smallest), int(400 * smallest)) in shapes


@pytest.mark.parametrize("recipe, names", [("robust", ["plain", "noisy", "aug"]), ("original", ["noisy", "aug"])])
def test_train_rs_aug_views_and_their_weights(recipe, names):
    """The views train_rs_aug.py trains on, in order, with their weights: the plain pair (robust only) and the noisy
    pair at rs_w, the augmented one at the ramp's value (aug_w = 2, start 0, end 8: 0.5 at step 2)."""
    _, args, views = train_rs_aug.parse(["--run_name", "r", "--recipe", recipe, "--std", "0.25", "--rs_w", "3",
                                         "--aug_start", "0", "--aug_end", "8", "--aug_w", "2"])
    got = views(_photo(batch=4), 2)
    assert [v.name for v in got] == names
    assert [v.weight for v in got] == [3.0] * (len(names) - 1) + [0.5]
    if recipe == "robust":  # every corruption but the real codec, the training ranges, each with probability 0.5
        from augment.view import augmentation_chain
        chain = augmentation_chain(args, "rs_aug")
        assert isinstance(chain, StochasticChain) and chain.p == 0.5
        assert [repr(c) for c in chain.corruptions] == [repr(build(name, "train")) for name in ALL if name != "codec"]


# ---------------------------------------------------------------------------------------- the script

def test_train_rs_aug_runs_logs_the_augmented_view_and_resumes(tmp_path, photo_folder, capsys):
    def run(max_step):
        return train_rs_aug.main(["--run_name", "aug", "--results_dir", str(tmp_path), "--max_step", str(max_step),
                                  "--std", "0.25", "--aug_start", "1", "--aug_end", "4", "--augs", "rotation,jpeg",
                                  "--aug_prob", "0.7", "--train_path", str(photo_folder), *TINY])

    summary = run(3)
    run_dir = tmp_path / "aug"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    tags = tensorboard_tags(run_dir / "tb")
    assert {"acc/plain", "acc/noisy", "acc/aug", "L_A/aug", "val/acc/aug"} <= tags
    assert "val/view aug: clean | stamped" in tags and "val/view noisy: clean | stamped" in tags
    assert {"acc/noisy", "acc/aug"} <= set(summary["test_crops"])  # plain is "acc" itself
    args = json.loads((run_dir / "args.json").read_text())
    assert args["augs"] == "rotation,jpeg" and args["aug_prb"] == 0.7

    capsys.readouterr()
    run(5)
    assert "at step 3" in capsys.readouterr().out
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 5


@pytest.mark.parametrize("flags, message", [
    (["--augs", "rotation,blurr"], "--augs: unknown corruption 'blurr'"),
    (["--aug_prob", "1.5"], "--aug_prob"),
    (["--aug_start", "10", "--aug_end", "5"], "--aug_end (5) must not be before --aug_start (10)"),
])
def test_train_rs_aug_refuses_bad_flags_by_name(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        train_rs_aug.main(["--run_name", "x", "--results_dir", str(tmp_path), *flags, *TINY])
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------ picture, benchmark

def test_gallery_draws_every_corruption_and_keeps_an_existing_file(tmp_path, capsys):
    out = tmp_path / "g.png"
    gallery.main(["--out", str(out), "--tile", "24"])
    with Image.open(out) as image:
        assert image.size == (24 * (len(ALL) + 1), (24 + gallery.LABEL_HEIGHT) * len(PRESETS))
    before = out.read_bytes()
    with pytest.raises(SystemExit):
        gallery.main(["--out", str(out), "--tile", "24"])
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before


def test_benchmark_times_every_corruption_and_the_chain(capsys):
    results = benchmark.main(["--quick", "--sizes", "32", "--device", "cpu"])
    (row,) = results.values()
    assert {f"{n} (train)" for n in ALL} <= set(row) and all(ms > 0 for ms in row.values())
    out = capsys.readouterr().out
    assert "chain of all 10 ('all'), p=0.5" in out and "resample: stamp.py's round trip at 4×" in out
    assert "--aug_resample, mean of 2 draws" in row
