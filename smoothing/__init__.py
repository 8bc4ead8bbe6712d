"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019) for the DeepRAFT scanner.

- `gaussian_noise_view(std)`: the training view of train_rs.py, the scanner sees [x, x'] + N(0, std²).
- `Smooth(scanner, sigma)`: `predict` (majority vote with a binomial test) and `certify` (class + certified
  L2 radius), returning `ABSTAIN` when the noise votes are not conclusive.
- `smoothing.certify`: certify a checkpoint on a folder of photos (`python -m smoothing.certify --help`); its
  TSV and table functions are reused by evaluate.py.
"""
from .core import ABSTAIN, Smooth, lower_confidence_bound
from .noise import add_std_flag, gaussian_noise_view

__all__ = ["ABSTAIN", "Smooth", "add_std_flag", "gaussian_noise_view", "lower_confidence_bound"]
