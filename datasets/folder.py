"""A dataset of square crops (or whole images) from a list of photo files."""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .images import (ImageReadError, NoImagesError, PathLike, find_images,
                     load_rgb, probe_image)

#: ``cache=None`` caches decoded images only up to this many files ...
AUTO_CACHE_MAX_FILES = 1000
#: ... and only while they take at most this many bytes as uint8 RGB. The
#: cache lives in every DataLoader worker, so it is multiplied by num_workers.
AUTO_CACHE_MAX_BYTES = 2 * 1024 ** 3

# How many unreadable files a warning names before summarising the rest.
_MAX_NAMES_LISTED = 10

# A grid item: (image index, (top, left) of a native-resolution tile), or
# (image index, None) for an image too small for one tile, which is centre-fit.
_GridItem = tuple[int, Optional[tuple[int, int]]]


class UnreadableImageWarning(UserWarning):
    """Some image files were skipped because they could not be read."""


def _grid_tiles(width: int, height: int, size: int,
                max_tiles: Optional[int]) -> list[Optional[tuple[int, int]]]:
    """Top-left corners of the non-overlapping ``size`` tiles of an image.

    The grid is centred, so the leftover border is split between both sides
    instead of always cutting the right and bottom edges. Returns ``[None]``
    (one centre-fit tile) when the image is smaller than ``size`` on a side.
    With ``max_tiles``, keeps that many tiles spread evenly in raster order.
    """
    rows, cols = height // size, width // size
    if rows == 0 or cols == 0:
        return [None]
    top0, left0 = (height - rows * size) // 2, (width - cols * size) // 2
    tiles = [(top0 + r * size, left0 + c * size) for r in range(rows) for c in range(cols)]
    if max_tiles is not None and len(tiles) > max_tiles:
        # The centre of each of max_tiles equal runs: distinct and symmetric,
        # e.g. a single tile is the middle one rather than the top-left corner.
        n = len(tiles)
        tiles = [tiles[(2 * k + 1) * n // (2 * max_tiles)] for k in range(max_tiles)]
    return tiles


def to_unit_float(batch: torch.Tensor, device: Union[torch.device, str]) -> torch.Tensor:
    """A uint8 batch from ``ImageFolderDataset(..., dtype=torch.uint8)`` → float32 in [0, 1] on ``device``.

    The uint8 batch travels (a quarter of float32's bytes, through the workers' shared memory and the
    host→device copy) and is converted only on ``device``: non-blocking, so a CUDA copy from the pinned
    memory the DataLoader gives (``pin_memory=True``) overlaps the host. On CPU this is the same code. The
    values equal the float dataset's exactly for native-resolution crops (the same ``/255`` in float32), and
    within 0.5/255 for resized ones (see ``ImageFolderDataset._finish``).
    """
    if batch.dtype != torch.uint8:
        raise TypeError(f"to_unit_float: expected a uint8 batch, got {batch.dtype}")
    return batch.to(device, non_blocking=True).to(torch.float32).div_(255.0)


class ImageFolderDataset(Dataset):
    """Square crops (or whole images) of photos as float tensors in [0, 1], or as uint8 in [0, 255].

    Modes:
        ``"random"``: a random ``size``×``size`` crop at native resolution,
            drawn from torch's global RNG (so ``torch.manual_seed`` and the
            DataLoader's per-worker seeding make it reproducible). An image
            smaller than ``size`` on a side is first upscaled (bicubic) so its
            short side equals ``size``. One item per image.
        ``"center"``: deterministic: resize so the short side equals ``size``
            (antialiased bicubic), then take the central square. One item per image.
        ``"grid"``: deterministic non-overlapping ``size``×``size`` tiles at
            native resolution, one item per tile; an image smaller than
            ``size`` gives one centre-fit tile. ``max_tiles_per_image`` caps
            the tiles of each image, keeping evenly spread ones.
        ``"full"``: the whole image at native resolution, shape (3, H, W);
            images differ in size, so batch them one at a time. ``size`` is
            ignored and may be ``None``.

    With ``dtype=torch.uint8`` every item is uint8 in [0, 255] (the training
    loader: a quarter of the bytes per batch; :func:`to_unit_float` converts
    a batch on the training device), otherwise float32 in [0, 1].

    Every file's header is checked at construction; unreadable files are left
    out, recorded in :attr:`skipped` and reported in one
    :class:`UnreadableImageWarning`. A file whose pixel data turns out to be
    corrupt only when decoded (e.g. a truncated JPEG) is reported with a
    warning and replaced by the next readable image, so a long training run
    never dies on one bad file. Such late failures are recorded in the process
    that hit them, i.e. in a DataLoader worker, not in the main process.

    Attributes:
        paths: the usable image files, in the order given.
        sizes: ``(width, height)`` of each usable file, EXIF orientation applied.
        skipped: ``(path, reason)`` of every file left out so far.
        cache: whether decoded images are kept in memory (per process).
    """

    MODES = ("random", "center", "grid", "full")

    def __init__(self, paths: Union[Iterable[PathLike], PathLike], size: Optional[int],
                 mode: str = "random", cache: Optional[bool] = None, min_side: int = 2,
                 max_tiles_per_image: Optional[int] = None, max_crop_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> None:
        """
        Args:
            paths: image files, or one directory/file to search with
                :func:`~datasets.images.find_images`.
            size: side of the square output crops in pixels (ignored for "full").
            mode: one of :attr:`MODES`.
            cache: keep decoded images in memory as uint8. ``None`` decides
                automatically: on for at most ``AUTO_CACHE_MAX_FILES`` images
                that fit in ``AUTO_CACHE_MAX_BYTES``.
            min_side: images with a smaller width or height are skipped.
            max_tiles_per_image: with ``mode="grid"``, at most this many tiles
                per image; ``None`` keeps all.
            max_crop_scale: with ``mode="random"``, the crop window covers between 1 and
                this many times ``size`` pixels per side of the source photo (uniformly
                drawn) and is resized to ``size``: scale jitter, so a few photos give
                content at many scales. 1 keeps native resolution.
            dtype: ``torch.float32`` (values in [0, 1]) or ``torch.uint8``
                (values in [0, 255], for :func:`to_unit_float` on the device).

        Raises:
            ValueError: invalid ``mode``, ``size``, ``max_tiles_per_image`` or ``dtype``.
            NoImagesError: no paths, or none of them is a readable image.
        """
        if mode not in self.MODES:
            raise ValueError(f"ImageFolderDataset: mode must be one of {self.MODES}, got {mode!r}")
        if mode != "full" or size is not None:
            size = _positive_int("size", size)
        if max_tiles_per_image is not None:
            if mode != "grid":
                raise ValueError("ImageFolderDataset: max_tiles_per_image only applies "
                                 f"to mode='grid', not mode={mode!r}")
            max_tiles_per_image = _positive_int("max_tiles_per_image", max_tiles_per_image)
        if not max_crop_scale >= 1.0:
            raise ValueError(f"ImageFolderDataset: max_crop_scale must be ≥ 1, got {max_crop_scale}")
        if max_crop_scale != 1.0 and mode != "random":
            raise ValueError(f"ImageFolderDataset: max_crop_scale only applies to mode='random', not {mode!r}")
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"ImageFolderDataset: dtype must be torch.float32 or torch.uint8, got {dtype}")
        self.mode = mode
        self.size = size
        self.dtype = dtype
        self.max_crop_scale = max_crop_scale
        self.min_side = min_side
        self.max_tiles_per_image = max_tiles_per_image

        # A lone str/Path would otherwise be iterated character by character.
        if isinstance(paths, (str, os.PathLike)):
            paths = find_images(paths)
        candidates = [Path(p) for p in paths]
        if not candidates:
            raise NoImagesError("ImageFolderDataset: no image paths given")
        self._display_root = _common_parent(candidates)

        self.paths: list[Path] = []
        self.sizes: list[tuple[int, int]] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                self.sizes.append(probe_image(path, min_side=min_side))
            except ImageReadError as exc:
                self.skipped.append((path, exc.reason))
            else:
                self.paths.append(path)
        if not self.paths:
            raise NoImagesError(f"none of the {len(candidates)} image files could be "
                                f"read: {self._describe(self.skipped)}")
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} of {len(candidates)} images that "
                          f"could not be read: {self._describe(self.skipped)}",
                          UnreadableImageWarning, stacklevel=2)

        self._grid: list[_GridItem] = []
        if mode == "grid":
            for index, (width, height) in enumerate(self.sizes):
                self._grid += [(index, tile) for tile in
                               _grid_tiles(width, height, size, max_tiles_per_image)]

        if cache is None:
            n_bytes = sum(3 * w * h for w, h in self.sizes)
            cache = len(self.paths) <= AUTO_CACHE_MAX_FILES and n_bytes <= AUTO_CACHE_MAX_BYTES
        self.cache = bool(cache)
        # A plain per-process dict: each DataLoader worker fills its own copy,
        # so no locking or shared memory is needed.
        self._pixels_cache: dict[int, torch.Tensor] = {}
        self._broken: set[int] = set()

    def photo_index(self, index: int) -> int:
        """The index in :attr:`paths` of the photo that item `index` comes from (in ``"grid"`` mode several
        tiles share one photo; otherwise item and photo are the same)."""
        return self._grid[index][0] if self.mode == "grid" else index

    def __len__(self) -> int:
        return len(self._grid) if self.mode == "grid" else len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Item ``index`` as float32 in [0, 1] (uint8 in [0, 255] with ``dtype=torch.uint8``),
        shape (3, size, size) ((3, H, W) for ``"full"``)."""
        if not 0 <= index < len(self):
            # IndexError (not ValueError) so that plain iteration stops here.
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image_index, tile = self._grid[index] if self.mode == "grid" else (index, None)

        n = len(self.paths)
        for step in range(n):
            candidate = (image_index + step) % n
            if candidate in self._broken:
                continue
            try:
                pixels = self._pixels(candidate)
            except ImageReadError as exc:
                self._mark_broken(candidate, exc.reason)
                continue
            # A substitute image has no tile of its own: it is centre-fit.
            return self._render(pixels, tile if candidate == image_index else None)
        raise NoImagesError(f"ImageFolderDataset: none of the {n} images could be "
                            f"decoded: {self._describe(self.skipped)}")

    def __repr__(self) -> str:
        size = "None" if self.size is None else self.size
        items = f", items={len(self)}" if self.mode == "grid" else ""
        return (f"{type(self).__name__}(mode={self.mode!r}, size={size}, "
                f"images={len(self.paths)}{items}, skipped={len(self.skipped)}, "
                f"cache={self.cache})")

    # -- decoding ---------------------------------------------------------

    def _pixels(self, index: int) -> torch.Tensor:
        """Decoded image ``index`` as uint8 (3, H, W), from the cache if possible."""
        pixels = self._pixels_cache.get(index)
        if pixels is None:
            pixels = TF.pil_to_tensor(load_rgb(self.paths[index], min_side=self.min_side))
            if self.cache:
                self._pixels_cache[index] = pixels
        return pixels

    def _mark_broken(self, index: int, reason: str) -> None:
        path = self.paths[index]
        self._broken.add(index)
        self.skipped.append((path, reason))
        warnings.warn(f"{path}: {reason}; using the next readable image instead",
                      UnreadableImageWarning, stacklevel=3)

    # -- cropping ---------------------------------------------------------
    # Crops are cut from the uint8 image first and only the crop is converted
    # and resized, which is much cheaper than resizing a whole 12 MP photo.
    # Slicing never writes to `pixels`, so cached images stay intact.

    def _render(self, pixels: torch.Tensor, tile: Optional[tuple[int, int]]) -> torch.Tensor:
        if self.mode == "full":
            return self._to_dtype(pixels)
        if self.mode == "random":
            return self._random_crop(pixels)
        size = self.size
        if tile is not None:
            top, left = tile
            # Tiles come from the header size; fall back to a centre fit in the
            # unlikely case that the decoded image is smaller than announced.
            if top + size <= pixels.shape[1] and left + size <= pixels.shape[2]:
                return self._finish(pixels[:, top:top + size, left:left + size])
        return self._center_fit(pixels)

    def _random_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        _, height, width = pixels.shape
        # In source pixels the window is `size`, or the short side when the
        # image is smaller: upscaling that square equals upscaling the image
        # first and then cropping.
        scale = 1.0 + (self.max_crop_scale - 1.0) * float(torch.rand(()))
        side = min(round(self.size * scale), height, width)
        top = int(torch.randint(0, height - side + 1, ()))
        left = int(torch.randint(0, width - side + 1, ()))
        return self._finish(pixels[:, top:top + side, left:left + side])

    def _center_fit(self, pixels: torch.Tensor) -> torch.Tensor:
        _, height, width = pixels.shape
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return self._finish(pixels[:, top:top + side, left:left + side])

    def _finish(self, square: torch.Tensor) -> torch.Tensor:
        """uint8 (3, s, s) -> (3, size, size): float32 in [0, 1], or uint8."""
        if square.shape[-1] == self.size:
            return self._to_dtype(square)
        if self.dtype == torch.uint8:
            # The resize stays here, on the CPU, on uint8: the crops of a batch differ in size (scale jitter,
            # photos of any size), so they cannot be batched before it. torchvision resizes a uint8 tensor
            # in float32 (the same antialiased bicubic on 0..255 instead of 0..1), clamps to [0, 255] and
            # rounds: within 0.5/255 of the float path below, which is the quantisation and nothing more.
            return TF.resize(square, [self.size, self.size],
                             interpolation=InterpolationMode.BICUBIC, antialias=True).contiguous()
        out = TF.resize(square.to(torch.float32).div_(255.0), [self.size, self.size],
                        interpolation=InterpolationMode.BICUBIC, antialias=True)
        return out.clamp_(0.0, 1.0).contiguous()  # bicubic overshoots near sharp edges

    def _to_dtype(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels at their size -> float32 in [0, 1], or a uint8 copy (never a view of the cache, which a
        caller could otherwise write to)."""
        if self.dtype == torch.uint8:
            return pixels.clone(memory_format=torch.contiguous_format)
        return pixels.to(torch.float32).div_(255.0).contiguous()

    # -- messages ---------------------------------------------------------

    def _describe(self, skipped: list[tuple[Path, str]]) -> str:
        """``"a.jpg (zero-byte file), b.jpg (...), and N more"``."""
        names = [f"{self._display(path)} ({reason})"
                 for path, reason in skipped[:_MAX_NAMES_LISTED]]
        if len(skipped) > _MAX_NAMES_LISTED:
            names.append(f"and {len(skipped) - _MAX_NAMES_LISTED} more")
        return ", ".join(names)

    def _display(self, path: Path) -> str:
        """``path`` relative to the common folder of all files, when possible."""
        if self._display_root is not None:
            try:
                return str(path.relative_to(self._display_root))
            except ValueError:
                pass
        return str(path)


def _positive_int(name: str, value: object) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"ImageFolderDataset: {name} must be a positive integer, "
                         f"got {value!r}") from None
    if number < 1:
        raise ValueError(f"ImageFolderDataset: {name} must be a positive integer, got {number}")
    return number


def _common_parent(paths: list[Path]) -> Optional[Path]:
    """Deepest folder containing all ``paths``; ``None`` if there is none
    (e.g. a mix of absolute and relative paths)."""
    try:
        return Path(os.path.commonpath([str(p.parent) for p in paths]))
    except ValueError:
        return None
