"""The images reference_stats.py reads, as uint8 (B, H, W, 3) batches: a data folder holding images.h5
(preprocessing.py), a folder of image files (each center-cropped as preprocessing.py crops it), an .npz batch."""
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from dataset.h5 import IMAGES_H5, ImageDataset
from dataset.image_files import center_crop_arr, image_files, read_rgb
from evaluation.npz import NpzImages
from utils.errors import UserError


class H5Images:
    """The images of DATA/images.h5, read by num_workers DataLoader workers."""

    def __init__(self, data_dir, num_workers=0):
        self.path, self.num_workers = data_dir, num_workers
        self.dataset = ImageDataset(data_dir)
        self.resolution = self.dataset.image_size[0]

    def __len__(self):
        return len(self.dataset)

    def batches(self, batch_size):
        """Yield uint8 (b, H, W, 3) tensors of at most batch_size images, in order."""
        for images, _ in DataLoader(self.dataset, batch_size=batch_size, num_workers=self.num_workers):
            yield images.permute(0, 2, 3, 1)


class FolderImages(Dataset):
    """The image files under a folder in preprocessing.py's order, decoded as it decodes them and center-cropped to
    resolution (the ADM crop), read by num_workers DataLoader workers."""

    def __init__(self, folder, resolution, num_workers=0):
        self.path, self.resolution, self.num_workers = folder, resolution, num_workers
        self.files = image_files(folder)
        if not self.files:
            raise UserError(f"{folder}: no files with an image extension under it")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        """(uint8 (R, R, 3) crop, "") of the index-th file, or (zeros, why) when it cannot be read: an exception
        raised in a worker would reach the user as a traceback."""
        try:
            crop = center_crop_arr(read_rgb(self.files[index])[0], self.resolution)
            return torch.from_numpy(crop.copy()), ""
        except Exception as error:
            why = f"{self.files[index]} cannot be read ({type(error).__name__}: {error})"
            return torch.zeros(self.resolution, self.resolution, 3, dtype=torch.uint8), why

    def batches(self, batch_size):
        """Yield uint8 (b, R, R, 3) tensors of at most batch_size images, in order; UserError at an unreadable file."""
        for images, errors in DataLoader(self, batch_size=batch_size, num_workers=self.num_workers):
            unreadable = [why for why in errors if why]
            if unreadable:
                raise UserError(f"{unreadable[0]}: remove it, or pack the folder with preprocessing.py (which skips "
                                "such files) and pass the data folder")
            yield images


def open_images(path, resolution=None, num_workers=0):
    """The images at path: a folder holding images.h5, a folder of image files (cropped to resolution, which they then
    need), or an .npz batch (arr_0). A resolution given for images.h5 or an .npz must be theirs."""
    path = Path(path)
    if path.is_dir() and not (path / IMAGES_H5).is_file():
        if resolution is None:
            raise UserError(f"{path} is a folder of image files (no {IMAGES_H5}): pass --resolution, the side of "
                            "their center crop")
        return FolderImages(path, resolution, num_workers)
    if path.is_dir():
        images = H5Images(path, num_workers)
    elif path.is_file():
        images = NpzImages(path)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if resolution is not None and images.resolution != resolution:
        raise UserError(f"{path} holds {images.resolution}-px images, not --resolution {resolution}: leave "
                        "--resolution out, or crop the images at that size")
    return images
