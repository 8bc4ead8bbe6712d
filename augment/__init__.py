"""Differentiable corruptions of forwarded photos, a registry by name, and the stochastic chain."""
from .chain import StochasticChain
from .corruptions import (JPEG, ColorJitter, Corruption, DefocusBlur, DownUpResize, GaussianBlur, GaussianNoise,
                          Perspective, RealCodec, ResizedCrop, Rotation, Shift, pillow_jpeg, to_pixels)
from .registry import CORRUPTIONS, OPT_IN, PRESETS, build, parse_names

__all__ = ["CORRUPTIONS", "JPEG", "OPT_IN", "PRESETS", "ColorJitter", "Corruption", "DefocusBlur", "DownUpResize",
           "GaussianBlur", "GaussianNoise", "Perspective", "RealCodec", "ResizedCrop", "Rotation", "Shift",
           "StochasticChain", "build", "parse_names", "pillow_jpeg", "to_pixels"]
