"""Image loading, train/val/test splitting and crop datasets for DeepRAFT.

Images leave this package as float32 tensors of shape (3, H, W) in [0, 1], or, for the training loader, as
uint8 (``ImageFolderDataset(..., dtype=torch.uint8)``) that ``to_unit_float`` converts on the training device.
"""

from .images import (IMAGE_EXTENSIONS, ImageReadError, NoImagesError, find_images,
                     is_image_file, load_rgb, probe_image, to_rgb, to_tensor)
from .samples import SAMPLE_PHOTOS, resolve_image_paths, sample_photo_paths
from .split import Split, split_files

__all__ = [
    "IMAGE_EXTENSIONS", "ImageFolderDataset", "ImageReadError", "NoImagesError",
    "SAMPLE_PHOTOS", "Split", "UnreadableImageWarning", "find_images", "is_image_file",
    "load_rgb", "probe_image", "resolve_image_paths", "sample_photo_paths",
    "split_files", "to_rgb", "to_tensor", "to_unit_float",
]


def __getattr__(name: str):
    # The crop dataset needs torch; importing it on first use keeps `import datasets` (and so
    # `python -m datasets.prepare` and its worker processes) to Pillow and numpy.
    if name in ("ImageFolderDataset", "UnreadableImageWarning", "to_unit_float"):
        from . import folder
        value = globals()[name] = getattr(folder, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
