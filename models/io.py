"""Shipped weights: safetensors files plus a config.json, loadable without unpickling anything."""
from __future__ import annotations

import json
import os
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


def config_from_dict(cls, values: dict, source: str):
    """Build a config dataclass, naming the file and the key when a field is unknown."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def save_pretrained(directory, encoder: StampEncoder, scanner: Scanner, extra: dict | None = None) -> Path:
    """Write encoder.safetensors, scanner.safetensors and config.json (configs + `extra`) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for module, name in ((encoder, ENCODER_NAME), (scanner, SCANNER_NAME)):
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        tmp = directory / (name + ".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, directory / name)
    config = {"encoder": asdict(encoder.config), "scanner": asdict(scanner.config), **(extra or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_pretrained(directory, device="cpu") -> tuple[StampEncoder, Scanner, dict]:
    """Read a directory written by save_pretrained → (encoder, scanner, config), both in eval mode."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; a model directory holds {CONFIG_NAME}, "
                                f"{ENCODER_NAME} and {SCANNER_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    encoder = StampEncoder(config_from_dict(StampEncoderConfig, config.get("encoder", {}), str(config_path)))
    scanner = Scanner(config_from_dict(ScannerConfig, config.get("scanner", {}), str(config_path)))
    for module, name in ((encoder, ENCODER_NAME), (scanner, SCANNER_NAME)):
        path = directory / name
        try:
            state = load_file(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing") from None
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        load_state_checked(module, state, str(path))
    return encoder.to(device).eval(), scanner.to(device).eval(), config


def load_state_checked(module: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict, with one clear line when the weights do not match the config's architecture."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: weights {tuple(state[k].shape)} "
                          f"vs config {tuple(own[k].shape)}")
        if missing:
            detail.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise ValueError(f"{source}: weights do not match the {type(module).__name__} config: "
                         + "; ".join(detail))
    module.load_state_dict(state)
