"""The evaluation behind evaluate.py: detection, imperceptibility, adversarial robustness, calibration, tables and plots."""
