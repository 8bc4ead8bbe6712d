"""The shared training loop and everything it needs: device, checkpoints, losses, evaluation, run folders."""
from .cli import build_parser
from .losses import View
from .training import plain_view, run_cli, train

__all__ = ["View", "build_parser", "plain_view", "run_cli", "train"]
