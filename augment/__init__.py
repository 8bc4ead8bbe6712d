"""Differentiable corruptions of forwarded photos, a registry by name, and the stochastic chain."""
from .chain import StochasticChain
from .corruptions import (JPEG, ColorJitter, Corruption, DefocusBlur, DownUpResize, GaussianBlur, GaussianNoise,
                          Perspective, ResizedCrop, Rotation, pillow_jpeg, to_pixels)
from .registry import CORRUPTIONS, PRESETS, build, parse_names

__all__ = ["CORRUPTIONS", "JPEG", "PRESETS", "ColorJitter", "Corruption", "DefocusBlur", "DownUpResize",
           "GaussianBlur", "GaussianNoise", "Perspective", "ResizedCrop", "Rotation", "StochasticChain", "build",
           "parse_names", "pillow_jpeg", "to_pixels"]
