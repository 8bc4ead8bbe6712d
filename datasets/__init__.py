"""Image loading, train/val/test splitting and crop datasets for DeepRAFT.

Images leave this package as float32 tensors of shape (3, H, W) in [0, 1].
"""

from .folder import ImageFolderDataset, UnreadableImageWarning
from .images import (IMAGE_EXTENSIONS, ImageReadError, NoImagesError, find_images,
                     is_image_file, load_rgb, probe_image, to_rgb, to_tensor)
from .samples import SAMPLE_PHOTOS, resolve_image_paths, sample_photo_paths
from .split import Split, split_files

__all__ = [
    "IMAGE_EXTENSIONS", "ImageFolderDataset", "ImageReadError", "NoImagesError",
    "SAMPLE_PHOTOS", "Split", "UnreadableImageWarning", "find_images", "is_image_file",
    "load_rgb", "probe_image", "resolve_image_paths", "sample_photo_paths",
    "split_files", "to_rgb", "to_tensor",
]
