"""Reading image files robustly and finding them on disk.

Every reader in DeepRAFT goes through :func:`load_rgb`, so that all photos
reach the models in one format (8-bit RGB, EXIF orientation applied) and every
unreadable file fails with a one-line :class:`ImageReadError` naming the file
and the problem, instead of a Pillow traceback from deep inside a DataLoader
worker.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# torch is imported inside to_tensor, so that reading images (datasets.prepare) needs only Pillow.
if TYPE_CHECKING:
    import torch

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions treated as images (compared case-insensitively).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')

# Pillow's decoders raise a zoo of exception types on malformed data (OSError
# for truncation, SyntaxError for bad headers, struct.error / IndexError /
# ValueError / ... from the pure-Python parsers). All of them mean "this file
# is broken", never a bug in our code, so they are translated together.
_PILLOW_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError,
                       KeyError, TypeError, ZeroDivisionError, struct.error)

# EXIF orientations 5-8 rotate by 90 or 270 degrees, i.e. swap width/height.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

# Background that transparent pixels are composited onto: white, as in a
# browser or image viewer, so a logo on a transparent background stays a logo
# on white instead of turning into whatever colour the hidden pixels hold.
_BACKGROUND = (255, 255, 255)


class ImageReadError(ValueError):
    """A file could not be read as an image; ``str()`` is ``"<path>: <reason>"``.

    Attributes:
        path: the offending file.
        reason: short human-readable cause, e.g. ``"zero-byte file"``.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NoImagesError(ValueError):
    """A path or a list of paths contains no usable image."""


def is_image_file(path: PathLike) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: Path) -> Image.Image:
    """Open ``path`` lazily with Pillow (header only), translating errors."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot access file ({exc.strerror})") from None
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    if stat.st_size == 0:
        raise ImageReadError(path, "zero-byte file")

    # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we refuse
    # both, because decoding such a file can exhaust memory in every worker.
    # (catch_warnings is process-global, which is fine: DataLoader workers
    # are processes, not threads.)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, _bomb_reason(exc)) from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except _PILLOW_DATA_ERRORS as exc:
        raise ImageReadError(path, f"corrupt image header ({exc})") from None


def _bomb_reason(exc: Exception) -> str:
    # Pillow's message: "Image size (400000000 pixels) exceeds limit of ... pixels, could be decompression bomb ..."
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels, which " if found else ""
    return (f"decompression bomb: {size}exceeds Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS} pixels (raise PIL.Image.MAX_IMAGE_PIXELS "
            f"if the file is trusted)")


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation tag (1-8); 1 (upright) when absent or unreadable."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _PILLOW_DATA_ERRORS:
        # A damaged EXIF block should not cost us an otherwise good photo.
        return 1
    return value if isinstance(value, int) else 1


def _check_size(path: Path, width: int, height: int, min_side: int) -> None:
    if min(width, height) < min_side:
        raise ImageReadError(
            path, f"image is too small ({width}×{height} px; "
                  f"need at least {min_side} px per side)")


def probe_image(path: PathLike, *, min_side: int = 2) -> tuple[int, int]:
    """Cheaply check that ``path`` looks like a usable image; return its size.

    Reads only the header (no pixel decoding), so it is fast enough to run on
    every file of a dataset at start-up. Truncated pixel data is *not*
    detected here; only :func:`load_rgb` finds that.

    Returns:
        ``(width, height)`` in pixels *after* EXIF orientation is applied,
        i.e. the size :func:`load_rgb` will return.

    Raises:
        ImageReadError: missing, directory, empty, not an image, corrupt
            header, decompression bomb, or smaller than ``min_side``.
    """
    path = Path(path)
    with _open(path) as img:
        width, height = img.size
        if _exif_orientation(img) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    _check_size(path, width, height, min_side)
    return width, height


def load_rgb(path: PathLike, *, min_side: int = 2) -> Image.Image:
    """Fully decode an image file as upright 8-bit RGB.

    EXIF orientation is applied, and every Pillow mode is converted to RGB
    (see :func:`to_rgb`): transparency is composited onto white, 16-bit and
    float greyscale are rescaled rather than clipped.

    Args:
        path: image file.
        min_side: smallest accepted width/height in pixels.

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``"RGB"``, not tied to an open file.

    Raises:
        ImageReadError: for any unreadable file, with a one-line reason.
    """
    path = Path(path)
    with _open(path) as img:
        # Force the full decode now: Image.open only parses the header, and a
        # truncated file would otherwise fail later, far from its file name.
        # ImageFile.LOAD_TRUNCATED_IMAGES is deliberately left off, so that
        # half-grey training images are reported rather than silently used.
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageReadError(path, _bomb_reason(exc)) from None
        except _PILLOW_DATA_ERRORS as exc:
            raise ImageReadError(path, f"truncated or corrupt image data ({exc})") from None
        try:
            upright = ImageOps.exif_transpose(img)
        except _PILLOW_DATA_ERRORS:
            upright = img  # damaged EXIF: keep the pixels, skip the rotation
        _check_size(path, upright.width, upright.height, min_side)
        try:
            rgb = to_rgb(upright)
        except ValueError as exc:
            raise ImageReadError(path, str(exc)) from None
        # exif_transpose/convert may return the very object backed by the file
        # we are about to close; copy in that case so the result stands alone.
        return rgb.copy() if rgb is img else rgb


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Rescale 16/32-bit integer or float greyscale to 8-bit RGB."""
    values = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0,
                               posinf=0.0, neginf=0.0)
        # Float images are either normalised to [0, 1] or stored on the 0..255
        # scale (Pillow's own convention for "F" -> "L"); tell them apart by range.
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        levels = np.clip(values, 0.0, 255.0)
    else:
        # "I;16*" are 16-bit by definition. Pillow also decodes 16-bit PNG and
        # TIFF greyscale into 32-bit "I", so that mode is read on the same
        # 0..65535 scale. Dividing by 257 maps 0 -> 0 and 65535 -> 255 exactly.
        levels = np.clip(values.astype(np.float64), 0.0, 65535.0) / 257.0
    grey = np.rint(levels).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a Pillow image of any mode to 8-bit ``"RGB"``.

    * ``RGBA``/``LA``/``PA``/premultiplied, and ``P``/``L``/``RGB`` with a
      ``transparency`` entry: composited onto a white background.
    * ``I;16*``/``I`` (16-bit greyscale): 0..65535 scaled to 0..255.
    * ``F``: [0, 1] scaled to 0..255, otherwise clipped to 0..255.
    * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr`` and others: Pillow's conversion.

    Raises:
        ValueError: for a mode Pillow cannot convert to RGB.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
            mode in ("P", "L", "RGB") and "transparency" in img.info):
        return _composite_on_white(img)
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(img)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported image mode {mode!r} ({exc})") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert a Pillow image to a float32 tensor of shape (3, H, W) in [0, 1].

    Non-RGB images are first converted with :func:`to_rgb`.
    """
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(to_rgb(img)).to(torch.float32).div_(255.0)


def find_images(root: PathLike) -> list[Path]:
    """List the image files at ``root``.

    Args:
        root: an image file (returned as the only element) or a directory,
            searched recursively. Symlinked sub-directories are followed
            (datasets often live on another disk); hidden files and
            directories (names starting with ``"."``) below ``root`` are
            skipped, e.g. ``.git`` or macOS ``._photo.jpg`` resource forks.

    Returns:
        Image paths (by extension, any case), sorted for a reproducible order.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NoImagesError: ``root`` is not an image file, or holds no image file.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    if root.is_file():
        if is_image_file(root):
            return [root]
        raise NoImagesError(f"{root}: not an image file (expected one of "
                            f"{', '.join(IMAGE_EXTENSIONS)})")

    found = []
    visited = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Guard against symlink cycles: never descend into a directory twice.
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and is_image_file(name) and path.is_file():
                found.append(path)
    if not found:
        raise NoImagesError(f"{root}: no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}) found")
    return sorted(found)
