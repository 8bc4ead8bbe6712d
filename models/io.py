"""Shipped weights: safetensors files plus a config.json, loadable without unpickling anything."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .encoder import StampEncoder, StampEncoderConfig
from .scanner import Scanner, ScannerConfig

CONFIG_NAME = "config.json"
ENCODER_NAME = "encoder.safetensors"
SCANNER_NAME = "scanner.safetensors"
#: scan.py's threshold, written by evaluate.py --write_calibration
CALIBRATION_NAME = "calibration.json"
#: where save_pretrained moves a calibration.json made for weights it has just replaced
STALE_CALIBRATION_NAME = "calibration.stale.json"


def config_from_dict(cls, values: dict, source: str):
    """Build a config dataclass, naming the file and the key when a field is unknown."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def save_pretrained(directory, encoder: StampEncoder, scanner: Scanner, extra: dict | None = None) -> Path:
    """Write encoder.safetensors, scanner.safetensors and config.json (configs + `extra`) into `directory`.

    config.json records the SHA-256 of each weights file ("sha256"), which load_pretrained checks: safetensors
    has no checksum of its own, so a damaged byte in the weights would otherwise load as a silently wrong model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = _recorded_digests(directory / CONFIG_NAME)
    digests = {}
    for module, name in ((encoder, ENCODER_NAME), (scanner, SCANNER_NAME)):
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        tmp = directory / (name + ".tmp")
        save_file(state, str(tmp))
        digests[name] = _sha256(tmp)
        os.replace(tmp, directory / name)
    config = {"encoder": asdict(encoder.config), "scanner": asdict(scanner.config), **(extra or {}),
              "sha256": digests}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    calibration = directory / CALIBRATION_NAME
    if calibration.is_file() and previous != digests:
        # A continued training re-exports into the folder that evaluate.py --write_calibration wrote into: that
        # threshold was measured on the previous weights, and scan.py would use it for these without a word.
        stale = directory / STALE_CALIBRATION_NAME
        os.replace(calibration, stale)
        warnings.warn(f"{calibration}: made for the previous weights; moved to {stale.name} (run evaluate.py "
                      f"--write_calibration again)", stacklevel=2)
    return directory


def _recorded_digests(config_path: Path) -> dict | None:
    """The "sha256" entry of an existing config.json; None when there is none or it cannot be read."""
    try:
        return json.loads(config_path.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def pretrained_dir(path) -> Path:
    """A model folder (holding config.json) or a run folder (holding model/config.json) → the model folder."""
    path = Path(path)
    return path / "model" if (path / "model" / CONFIG_NAME).is_file() else path


def load_pretrained(directory, device="cpu") -> tuple[StampEncoder | None, Scanner, dict]:
    """Read a directory written by save_pretrained → (encoder, scanner, config), both in eval mode.

    A scanner-only folder (config.json without "encoder", no encoder.safetensors; e.g. a detector of the
    original code converted by models.convert_original) gives encoder None: it can scan, not stamp."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; a model directory holds {CONFIG_NAME}, "
                                f"{ENCODER_NAME} and {SCANNER_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(k, {}), dict) for k in ("encoder", "scanner")):
        raise ValueError(f"{config_path}: not a model config (a JSON object with \"encoder\" and \"scanner\" "
                         f"objects)")
    try:
        encoder = (StampEncoder(config_from_dict(StampEncoderConfig, config["encoder"], str(config_path)))
                   if "encoder" in config else None)
        scanner = Scanner(config_from_dict(ScannerConfig, config.get("scanner", {}), str(config_path)))
    except (TypeError, ValueError) as e:  # a value of the wrong type or out of range
        message = str(e) if str(e).startswith(str(config_path)) else f"{config_path}: invalid model config ({e})"
        raise ValueError(message) from None
    digests = config.get("sha256") if isinstance(config.get("sha256"), dict) else {}
    for module, name in ((encoder, ENCODER_NAME), (scanner, SCANNER_NAME)):
        if module is None:  # a scanner-only folder
            continue
        path = directory / name
        try:
            state = load_file(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing") from None
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if name in digests and _sha256(path) != digests[name]:
            raise ValueError(f"{path}: damaged or replaced: its SHA-256 differs from the one {CONFIG_NAME} recorded "
                             f"when it was saved")
        load_state_checked(module, state, str(path))
    if encoder is not None:
        encoder = encoder.to(device).eval()
    return encoder, scanner.to(device).eval(), config


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_checked(module: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict, with one clear line when the weights do not match the config's architecture (names,
    shapes, floating point or not), or hold NaN or infinity (weights saved from a run that diverged)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape
                   or own[k].is_floating_point() != state[k].is_floating_point())
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} shape or dtype mismatch(es), e.g. {k}: weights {tuple(state[k].shape)} "
                          f"{state[k].dtype} vs config {tuple(own[k].shape)} {own[k].dtype}")
        if missing:
            detail.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise ValueError(f"{source}: weights do not match the {type(module).__name__} config: "
                         + "; ".join(detail))
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all()))
    if nonfinite:
        raise ValueError(f"{source}: {len(nonfinite)} tensor(s) hold NaN or infinity, e.g. {nonfinite[0]}; these "
                         f"weights come from a run that diverged or a damaged file")
    module.load_state_dict(state)
