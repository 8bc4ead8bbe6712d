"""Stamp encoder and scanner: shapes on odd sizes, gradients, border-blindness, configs, saved weights."""
import json

import pytest
import torch
import torchvision


from models import Scanner, ScannerConfig, StampEncoder, StampEncoderConfig, load_pretrained, save_pretrained
from models.scanner import valid_min_size

TINY_ENCODER = StampEncoderConfig(width=0.25)


def _randomise_output_layer(encoder):
    # A large output layer: a residual far from zero, to test the structure with.
    torch.manual_seed(0)
    torch.nn.init.normal_(encoder.to_residual.weight, std=1.0)


@pytest.mark.parametrize("size", [(67, 93), (1, 1), (5, 33), (64, 64)])
def test_encoder_shape_bound_and_gradients_on_odd_sizes(size):
    encoder = StampEncoder(TINY_ENCODER)
    _randomise_output_layer(encoder)
    x = torch.rand(2, 3, *size, requires_grad=True)
    residual = encoder(x)
    assert residual.shape == x.shape
    assert residual.abs().max() <= TINY_ENCODER.max_residual + 1e-7
    stamped = encoder.stamp(x)
    assert stamped.min() >= 0 and stamped.max() <= 1
    residual.pow(2).sum().backward()
    grads = [p.grad for p in encoder.parameters()] + [x.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("max_residual", [0.05, 0.0])
def test_the_bound_of_the_unbounded_residual_is_the_residual(max_residual):
    """forward = bound(forward(bounded=False)); the bound is m·tanh(u/m) (u itself when m is 0)."""
    encoder = StampEncoder(StampEncoderConfig(width=0.25, max_residual=max_residual))
    _randomise_output_layer(encoder)
    torch.nn.init.constant_(encoder.to_residual.bias, 3.0)  # past the bound: tanh(3) = 0.995
    x = torch.rand(2, 3, 16, 16)
    u = encoder(x, bounded=False)
    assert torch.equal(encoder(x), encoder.bound(u))
    m = max_residual
    assert torch.allclose(encoder.bound(u), m * torch.tanh(u / m) if m else u, atol=1e-7)
    assert u.abs().max() > 2 * max(m, 0.01)  # the unbounded residual does go past the bound here


@pytest.mark.parametrize("arch", ["narrow", "resnet18", "fast"])
@pytest.mark.parametrize("size", [(67, 93), (1, 1), (33, 17), (150, 113)])
def test_scanner_two_logits_on_any_size_with_gradients(arch, size):
    scanner = Scanner(ScannerConfig(arch))
    x = torch.rand(2, 3, *size, requires_grad=True)
    logits = scanner(x)
    assert logits.shape == (2, 2)
    logits[:, 1].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_resnet18_scanner_is_torchvisions_resnet18():
    ours = Scanner(ScannerConfig("resnet18"))
    theirs = torchvision.models.resnet18(num_classes=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())  # strict: same names, same shapes


def test_narrow_scanner_is_much_smaller():
    narrow = sum(p.numel() for p in Scanner(ScannerConfig("narrow")).parameters())
    full = sum(p.numel() for p in Scanner(ScannerConfig("resnet18")).parameters())
    assert narrow * 10 < full


def test_fast_scanner_is_blind_to_position():
    """No padding: shifting the content by the net's total stride (32) shifts its feature map by one cell, so a
    pattern found anywhere in the interior gives the same features, and a flat image the same everywhere."""
    scanner = Scanner(ScannerConfig("fast")).eval()
    assert scanner.min_size == valid_min_size() == 108
    assert not any(m.padding != (0, 0) for m in scanner.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        a = scanner.features((x[..., :268, :268] - scanner.mean) / scanner.std)
        b = scanner.features((x[..., 32:, 32:] - scanner.mean) / scanner.std)
    assert torch.allclose(a[..., 1:, 1:], b[..., :-1, :-1], atol=1e-5)


def test_unknown_scanner_arch_is_refused_by_name():
    with pytest.raises(ValueError, match="resnet999"):
        ScannerConfig("resnet999")


def test_encoder_width_multiplier_scales_channels():
    assert StampEncoderConfig(width=1.0).channels() == (32, 32, 64, 128, 256)
    assert StampEncoderConfig(width=0.5).channels() == (16, 16, 32, 64, 128)


def test_replicate_padding_keeps_the_encoder_blind_to_the_border():
    """The border-stripe pitfall: with zero padding a flat image gets a residual that differs at the border,
    i.e. the network knows where the border is. With replicate padding it cannot."""
    x = torch.full((1, 3, 48, 40), 0.4)
    for padding_mode, blind in (("replicate", True), ("zeros", False)):
        encoder = StampEncoder(StampEncoderConfig(width=0.25, padding_mode=padding_mode))
        _randomise_output_layer(encoder)
        with torch.no_grad():
            residual = encoder(x)
        spread = (residual - residual[..., 24:25, 20:21]).abs().max().item()
        assert (spread < 1e-6) == blind, (padding_mode, spread)


def test_replicate_padding_keeps_the_scanner_blind_to_the_border():
    # A flat image and a larger flat image give the same logits: no position signal from padding.
    scanner = Scanner(ScannerConfig("narrow")).eval()
    with torch.no_grad():
        small = scanner(torch.full((1, 3, 64, 64), 0.7))
        large = scanner(torch.full((1, 3, 128, 96), 0.7))
    assert torch.allclose(small, large, atol=1e-5)


def test_save_and_load_pretrained_round_trip(tmp_path):
    encoder, scanner = StampEncoder(TINY_ENCODER), Scanner(ScannerConfig("narrow"))
    _randomise_output_layer(encoder)
    save_pretrained(tmp_path, encoder, scanner, extra={"step": 7})
    encoder2, scanner2, config = load_pretrained(tmp_path)
    assert config["step"] == 7 and encoder2.config == TINY_ENCODER and scanner2.config.arch == "narrow"
    x = torch.rand(1, 3, 37, 41)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x), encoder2(x))
        assert torch.equal(scanner.eval()(x), scanner2(x))


def test_saving_new_weights_moves_a_calibration_of_the_old_ones_aside(tmp_path):
    """A threshold calibrated on the previous weights must not be read for new ones (a continued training
    re-exports into the same folder); saving the same weights again keeps it."""
    encoder, scanner = StampEncoder(TINY_ENCODER), Scanner(ScannerConfig("narrow"))
    save_pretrained(tmp_path, encoder, scanner)
    (tmp_path / "calibration.json").write_text('{"threshold": 0.9}')
    save_pretrained(tmp_path, encoder, scanner, extra={"step": 2})
    assert (tmp_path / "calibration.json").read_text() == '{"threshold": 0.9}'
    with torch.no_grad():
        scanner.fc.bias.add_(1.0)
    with pytest.warns(UserWarning, match="calibration.json: made for the previous weights"):
        save_pretrained(tmp_path, encoder, scanner)
    assert not (tmp_path / "calibration.json").exists()
    assert (tmp_path / "calibration.stale.json").read_text() == '{"threshold": 0.9}'


def test_load_pretrained_refuses_mismatched_config_naming_the_file(tmp_path):
    save_pretrained(tmp_path, StampEncoder(TINY_ENCODER), Scanner(ScannerConfig("narrow")))
    config = json.loads((tmp_path / "config.json").read_text())
    config["scanner"]["arch"] = "resnet18"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"scanner\.safetensors: weights do not match the Scanner config"):
        load_pretrained(tmp_path)


def test_load_pretrained_refuses_corrupted_weights(tmp_path):
    save_pretrained(tmp_path, StampEncoder(TINY_ENCODER), Scanner(ScannerConfig("narrow")))
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="encoder.safetensors: not a readable safetensors file"):
        load_pretrained(tmp_path)


# ------------------------------------------------------------------------------- the original code's networks
#: (name, shape) of every tensor of the original modules (model.py of xinghua-qu/DeepRAFT), as their state dicts
#: name them; ours hold them under `net.`.
ORIGINAL_DETECTOR = {"model.0.conv.weight": (8, 3, 3, 3), "model.1.conv.weight": (16, 8, 3, 3),
                     "model.2.conv.weight": (32, 16, 3, 3), "model.3.conv.weight": (64, 32, 3, 3),
                     "model.4.conv.weight": (1, 64, 3, 3), "fc1.linear.weight": (100, 625), "fc2.linear.weight": (2, 100)}
ORIGINAL_ENCODER = {"hidden_dense.linear.weight": (7500, 100), "embedder.model.0.conv.weight": (8, 3, 3, 3),
                    "embedder.model.4.conv.weight": (1, 64, 3, 3), "embedder.fc1.linear.weight": (100, 625),
                    "conv1.conv.weight": (32, 6, 3, 3), "conv5.conv.weight": (256, 128, 3, 3),
                    "up6.conv.weight": (128, 256, 3, 3), "conv6.conv.weight": (128, 256, 3, 3),
                    "conv9.conv.weight": (32, 70, 3, 3), "residual.conv.weight": (3, 32, 1, 1)}


def test_original_detector_and_encoder_have_the_original_tensors():
    scanner = Scanner(ScannerConfig("deepraft", "zeros"))
    shapes = {k[len("net."):]: tuple(v.shape) for k, v in scanner.state_dict().items()}
    assert {k: shapes[k] for k in ORIGINAL_DETECTOR} == ORIGINAL_DETECTOR
    assert len(shapes) == 2 * len(ORIGINAL_DETECTOR)  # a weight and a bias each, nothing else (no BatchNorm)
    encoder = StampEncoder(StampEncoderConfig(arch="stegastamp", max_residual=0, padding_mode="zeros"))
    shapes = {k[len("net."):]: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert {k: shapes[k] for k in ORIGINAL_ENCODER} == ORIGINAL_ENCODER
    assert len(shapes) == 2 * (1 + 6 + 9 + 4 + 1)  # dense, embedder (5 convs + dense), conv1-9, up6-9, residual


def test_original_networks_take_400_only_and_shift_the_input():
    scanner = Scanner(ScannerConfig("deepraft", "zeros"))
    x = torch.rand(2, 3, 400, 400)
    # the input is shifted by -0.5: a mid-grey image gives the same output as the network on zeros
    net = scanner.net
    grey = torch.full((1, 3, 400, 400), 0.5)
    by_hand = net.fc2(net.fc1(torch.flatten(net.model(torch.zeros_like(grey)), 1)))
    assert torch.allclose(scanner(grey), by_hand)
    encoder = StampEncoder(StampEncoderConfig(arch="stegastamp", max_residual=0))
    assert encoder(x).shape == x.shape and encoder.input_size == scanner.input_size == 400
    for module in (scanner, encoder):
        with pytest.raises(ValueError, match="400x400 images only"):
            module(torch.rand(1, 3, 256, 256))


def test_max_residual_zero_leaves_the_residual_unbounded_and_positive_bounds_it():
    torch.manual_seed(0)
    bounded = StampEncoder(StampEncoderConfig(width=0.25, max_residual=0.05))
    free = StampEncoder(StampEncoderConfig(width=0.25, max_residual=0.0))
    free.load_state_dict(bounded.state_dict())
    x = torch.rand(1, 3, 24, 24)
    raw = free(x)
    assert torch.allclose(bounded(x), 0.05 * torch.tanh(raw), atol=1e-7)
    with pytest.raises(ValueError, match="max_residual"):
        StampEncoderConfig(max_residual=-1)
