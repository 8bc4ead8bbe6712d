"""The two networks of DeepRAFT and their configs."""
from .encoder import StampEncoder, StampEncoderConfig
from .scanner import CLEAN, STAMPED, Scanner, ScannerConfig
from .io import load_pretrained, save_pretrained

__all__ = [
    "CLEAN", "STAMPED", "Scanner", "ScannerConfig", "StampEncoder", "StampEncoderConfig",
    "load_pretrained", "save_pretrained",
]
