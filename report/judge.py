"""The verdict a platform acts on: the scanner's, or its smoothed version's (Cohen et al.'s PREDICT)."""
from __future__ import annotations

import contextlib

import torch

from engine.device import full_precision
from models import STAMPED
from smoothing import Smooth
from smoothing.sequential import look_schedule


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode inside, each submodule's own mode restored after: `model.train(was)` would also switch a
    wrapped scanner (NoisyScanner's, created in training mode) or a frozen BatchNorm into training mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class Judge:
    """Verdicts and detection scores for a batch of images.

    Plain: verdict = argmax of the logits; score = logit[STAMPED] − logit[CLEAN] (verdict STAMPED iff > 0).
    Smoothed (sigma given): each image is judged by Smooth.predict with n noise samples, a class or ABSTAIN
    (-1); score = the fraction of noisy samples the base scanner called STAMPED. Abstentions count as wrong
    in every accuracy: a platform must act on each photo.
    """

    def __init__(self, scanner: torch.nn.Module, sigma: float | None = None, n: int = 1000, alpha: float = 0.001,
                 batch_size: int = 200, seed: int = 0, sequential: bool = True):
        """batch_size: noisy copies (smoothed) or images (plain) classified at once. sequential: PREDICT stops at
        the first decisive look (smoothing.sequential; the images of a batch share forward passes), else it draws
        n copies per image (Cohen's fixed-n PREDICT). `n_used` collects the copies each verdict took."""
        self.scanner = scanner
        self.sigma, self.n, self.alpha, self.batch_size = sigma, n, alpha, batch_size
        self.sequential, self.n_used = sequential, []
        self.smooth = Smooth(scanner, sigma) if sigma is not None else None
        self.seed = seed
        self._generator = None

    @property
    def smoothed(self) -> bool:
        return self.smooth is not None

    def describe(self) -> str:
        if not self.smoothed:
            return "plain scanner: argmax of the logits"
        how = "PREDICT"
        if self.sequential:  # the judge tests against PREDICT's ½
            how = f"sequential PREDICT (looks at {', '.join(map(str, look_schedule(self.n, 0.5, self.alpha)))} copies)"
        return f"smoothed scanner: {how} with σ {self.sigma}, n {self.n}, alpha {self.alpha}"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,H,W) in [0,1] → (verdicts (B,) int64 with ABSTAIN = -1, scores (B,) float32), on CPU.

        The scanner is judged in eval mode; its mode is restored afterwards."""
        with eval_mode(self.scanner):
            return self._plain(x) if not self.smoothed else self._smoothed(x)

    def _plain(self, x):
        device = next(self.scanner.parameters()).device
        logits = []
        for chunk in x.split(self.batch_size):
            chunk = chunk.to(device)
            with full_precision(device):  # fp32, as Smooth and the attacks: one calibration for every device
                logits.append(self.scanner(chunk).float().cpu())
        logits = torch.cat(logits) if logits else torch.zeros(0, 2)
        return logits.argmax(1), logits[:, STAMPED] - logits[:, 1 - STAMPED]

    def _smoothed(self, x):
        if self._generator is None:
            self._generator = torch.Generator(device=self.smooth.device).manual_seed(self.seed)
        if self.sequential:
            verdicts, votes, used = self.smooth.predict_sequential(x, self.n, self.alpha, self.batch_size,
                                                                   self._generator, positive=STAMPED)
            self.n_used += used.tolist()
            return verdicts, (votes.double() / used).float()
        verdicts, scores = [], []
        for image in x:
            counts = self.smooth.counts(image, self.n, self.batch_size, self._generator)
            verdicts.append(Smooth.decide(counts, self.alpha))
            scores.append(float(counts[STAMPED]) / self.n)
            self.n_used.append(self.n)
        return torch.tensor(verdicts), torch.tensor(scores)
