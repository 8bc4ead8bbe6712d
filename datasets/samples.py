"""Fallback training photos shipped inside the scikit-image wheel.

When no dataset path is given, DeepRAFT trains and evaluates on a handful of
real photographs that scikit-image installs alongside its code, so a smoke run
works offline with nothing to download.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .images import PathLike, find_images

#: Photos in ``skimage.data.data_dir``. Only the left motorcycle view is used:
#: the right view is a near-duplicate and would leak across the split.
SAMPLE_PHOTOS = ('astronaut.png', 'brick.png', 'camera.png', 'cell.png', 'chelsea.png',
                 'coffee.png', 'coins.png', 'grass.png', 'gravel.png',
                 'hubble_deep_field.jpg', 'ihc.png', 'moon.png', 'motorcycle_left.png',
                 'retina.jpg', 'rocket.jpg')


def sample_photo_paths() -> list[Path]:
    """Paths of the :data:`SAMPLE_PHOTOS`, in that order.

    Raises:
        ImportError: scikit-image is not installed.
        FileNotFoundError: a photo is missing from the scikit-image install.
    """
    try:
        # Only the location is needed; skimage.data loads its modules lazily,
        # so this import is cheap and reads no image.
        from skimage.data import data_dir
    except ImportError as exc:
        raise ImportError("scikit-image is not installed; it provides the sample photos "
                          "used when no --train_path/--data_path is given") from exc
    paths = [Path(data_dir, name) for name in SAMPLE_PHOTOS]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir}: scikit-image sample photo(s) missing: "
                                f"{', '.join(missing)} (reinstall scikit-image)")
    return paths


def resolve_image_paths(path: Optional[PathLike],
                        log: Callable[[str], object] = print) -> list[Path]:
    """The image files to use: those under ``path``, or the sample photos.

    Args:
        path: an image file or a folder (searched recursively); ``None`` to
            fall back to the scikit-image sample photos.
        log: receives two lines announcing the fallback.

    Raises:
        ValueError: ``path`` is an empty string (which would mean the cwd).
        FileNotFoundError, NoImagesError: see :func:`~datasets.images.find_images`.
    """
    if path is not None:
        if not str(path).strip():
            raise ValueError("empty image path; pass a file or folder, or None "
                             "for the sample photos")
        return find_images(path)
    paths = sample_photo_paths()
    log(f"no --train_path/--data_path given: using the {len(paths)} "
        f"scikit-image sample photos")
    log(", ".join(p.name for p in paths))
    return paths
