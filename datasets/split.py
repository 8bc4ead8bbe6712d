"""Deterministic train/val/test split of a list of image files.

The paper holds out 10% of the photos for testing and takes 2% of the
remaining training photos for validation. The split is a pure function of the
*set* of paths and the seed, so every run (and every engineer) that points at
the same folder gets the same held-out images.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .images import PathLike


@dataclass(frozen=True)
class Split:
    """Image paths of each subset; each list is sorted.

    For three or more distinct files the lists are disjoint and together hold
    every file. With one or two files ``val`` and ``test`` repeat ``train``.
    """

    train: list[Path]
    val: list[Path]
    test: list[Path]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"split_files: {name} must be in [0, 1), got {value}")


def _share(n: int, frac: float) -> int:
    """``round(n * frac)`` (halves up), but at least 1 for a non-zero fraction."""
    if frac == 0.0:
        return 0
    return max(1, math.floor(n * frac + 0.5))


def split_files(paths: Iterable[PathLike], seed: int = 0, test_frac: float = 0.1,
                val_frac: float = 0.02) -> Split:
    """Split image files into train/val/test as in the paper.

    First ``test_frac`` of all files go to test, then ``val_frac`` of the
    rest to val; the remainder is train. Each non-zero share is at least one
    file, and train always keeps at least one, so e.g. 100 files give
    88/2/10 and 3 files give 1/1/1.

    The paths are de-duplicated and sorted before a seeded shuffle, so the
    result does not depend on the order the paths were listed in. Adding or
    removing a file reshuffles the whole split.

    Args:
        paths: image files (str or Path).
        seed: seed of the shuffle; a different seed gives a different split.
        test_frac: fraction of all files held out for testing, in [0, 1).
        val_frac: fraction of the non-test files used for validation, in [0, 1).

    Returns:
        A :class:`Split` of sorted path lists.

    Raises:
        ValueError: no paths, or a fraction outside [0, 1).

    Warns:
        UserWarning: with only one or two files, which then serve as train,
            val and test at once (evaluation is not held out).
    """
    _check_fraction("test_frac", test_frac)
    _check_fraction("val_frac", val_frac)
    # De-duplicate: a file listed twice could otherwise land in train and test.
    files = sorted({Path(p) for p in paths})
    n = len(files)
    if n == 0:
        raise ValueError("split_files: no image paths to split")
    if n < 3:
        warnings.warn(
            f"only {n} image(s): using the same image(s) for train, val and "
            f"test, so evaluation is not held out", UserWarning, stacklevel=2)
        return Split(train=list(files), val=list(files), test=list(files))

    # Leave at least one file for train (and one for val if it is wanted).
    n_test = min(_share(n, test_frac), n - 1 - (val_frac > 0.0))
    n_val = min(_share(n - n_test, val_frac), n - n_test - 1)

    order = list(files)
    random.Random(seed).shuffle(order)
    test = order[:n_test]
    val = order[n_test:n_test + n_val]
    train = order[n_test + n_val:]
    return Split(train=sorted(train), val=sorted(val), test=sorted(test))
