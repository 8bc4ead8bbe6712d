"""Stochastic concatenation: a random subset of corruptions, in random order, with per-sample strengths."""
from __future__ import annotations

import torch
from torch import nn

from .corruptions import Corruption
from .registry import build, parse_names


class StochasticChain(nn.Module):
    """Applies each of its corruptions to each sample independently with probability p, in an order drawn
    afresh for every batch, every applied one at the sample's strength (its parameters drawn per sample).

    `forward(x, strength=None)` takes the strength like a single corruption does (None = 1, a number or a (B,)
    tensor in [0,1]); training passes the schedule's value (`engine.training.ramp`). Batched throughout: a sample
    that skips a corruption gets strength 0, which every corruption returns unchanged.
    """

    def __init__(self, corruptions: list[Corruption], p: float = 0.5):
        super().__init__()
        if not corruptions:
            raise ValueError("a StochasticChain needs at least one corruption")
        if not 0 < p <= 1:
            raise ValueError(f"the probability of applying each corruption must be in (0, 1], got {p}")
        self.corruptions = nn.ModuleList(corruptions)
        self.p = p

    @classmethod
    def from_names(cls, names, preset: str = "train", p: float = 0.5) -> "StochasticChain":
        """StochasticChain.from_names("rotation,jpeg", preset="eval", p=0.5); 'all' for every corruption."""
        return cls([build(n, preset) for n in parse_names(names)], p)

    def forward(self, x: torch.Tensor, strength: float | torch.Tensor | None = None) -> torch.Tensor:
        Corruption._check_input(x, type(self).__name__)
        s = Corruption._strength(strength, x)
        for i in torch.randperm(len(self.corruptions)).tolist():
            applied = torch.rand(s.shape, device=x.device) < self.p
            x = self.corruptions[i]._apply(x, s * applied)  # s is checked: no second check (a read) per corruption
        return x

    def extra_repr(self):
        return f"p={self.p}"

