"""Datasets over the packed HDF5 files (images.h5 and the cached latents NAME.h5).

Files (written by preprocessing.py and cache_latents.py):
  DATA/images.h5       `00000/img00000000.png` uncompressed PNG bytes per image, `dataset.json` labels
  DATA/images_h5.json  list of the names in images.h5
  DATA/NAME.h5         `00000/img-mean-std-00000000.npy` float32 (2C, h, w): posterior mean then std
  DATA/NAME_h5.json    list of the names in NAME.h5
Missing, damaged or malformed files raise UserError naming the file and the command that writes it again.
"""
import functools
import io
import json
import os

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import UserError

IMAGES_H5, IMAGES_JSON = "images.h5", "images_h5.json"


def latent_name(image_name):
    """Latent entry of an image entry: 00000/img00000012.png -> 00000/img-mean-std-00000012.npy."""
    folder, base = os.path.split(image_name)
    return f"{folder}/{base.replace('img', 'img-mean-std-', 1).replace('.png', '.npy')}"


def rewrite_hint(path):
    """The command that writes a data file (DATA/images.h5, DATA/NAME.h5 or their name lists) again."""
    folder, base = os.path.split(str(path))
    folder = folder or "."
    if base in (IMAGES_H5, IMAGES_JSON):
        return f"preprocessing.py --output-path {folder} --overwrite"
    name = base.removesuffix("_h5.json").removesuffix(".h5")
    return f"cache_latents.py --output-dir {folder} --vae-latents-name {name} --overwrite"


def open_h5(path):
    """h5py.File(path, "r"); a damaged or truncated file raises UserError naming it (h5py's error does not)."""
    try:
        return h5py.File(path, "r")
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as error:
        raise UserError(f"{path} is damaged or truncated ({error}): write it again with {rewrite_hint(path)}") \
            from error


def read_entry(h5f, name):
    """Decode one entry: .png -> uint8 (C, H, W) array, .json -> object, .npy -> array; errors name file and entry."""
    try:
        return _decode_entry(h5f, name)
    except Exception as error:
        raise UserError(f"{h5f.filename}: entry {name} cannot be read ({type(error).__name__}: {error}); the file is "
                        f"damaged: write it again with {rewrite_hint(h5f.filename)}") from error


def _decode_entry(h5f, name):
    """read_entry without the error context."""
    if name.endswith(".png"):
        image = np.asarray(Image.open(io.BytesIO(h5f[name][()])))
        return np.ascontiguousarray(image.reshape(*image.shape[:2], -1).transpose(2, 0, 1))
    if name.endswith(".json"):
        return json.loads(h5f[name][()].decode("utf-8"))
    if name.endswith(".npy"):
        return h5f[name][()]
    raise ValueError(f"unknown entry type: {name}")


class LazyH5:
    """An HDF5 file opened on first use in each process: h5py handles must not cross the DataLoader's fork."""

    def __init__(self, path):
        self.path = path
        self._file, self._pid = None, None

    def get(self):
        """The handle for the current process."""
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open_h5(self.path), os.getpid()
        return self._file

    def __getstate__(self):
        """Pickle (spawned workers) without the open handle."""
        return {"path": self.path, "_file": None, "_pid": None}


def png_size(h5_path, name):
    """(H, W) of the PNG entry `name`, read from its header (no decoding)."""
    with open_h5(h5_path) as h5f, Image.open(io.BytesIO(h5f[name][()])) as image:
        width, height = image.size
    return height, width


def check_data_files(data_dir, names, command):
    """Raise UserError naming --data-dir and `command` (what writes them) unless data_dir holds every file of names."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such folder; run {command} to make it")
    missing = [name for name in names if not os.path.isfile(os.path.join(data_dir, name))]
    if missing:
        raise UserError(f"--data-dir {data_dir}: holds no {' and no '.join(missing)}; run {command}")


def _list_entries(json_path, extension):
    """Sorted names with the given extension from a NAME_h5.json list."""
    try:
        with open(json_path) as f:
            names = json.load(f)
    except ValueError as error:  # not JSON, or not text
        raise UserError(f"{json_path} is not valid JSON ({error}): write it again with {rewrite_hint(json_path)}") \
            from error
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UserError(f"{json_path} is not a JSON list of entry names: write it again with "
                        f"{rewrite_hint(json_path)}")
    names = sorted(name for name in set(names) if name.endswith(extension))
    if not names:
        raise UserError(f"{json_path} lists no {extension} entries: write it again with {rewrite_hint(json_path)}")
    return names


def _read_labels(h5_path, names):
    """int64 label of every name from the dataset.json entry of h5_path."""
    fix = f"write it again with {rewrite_hint(h5_path)}"
    with open_h5(h5_path) as h5f:
        if "dataset.json" not in h5f:
            raise UserError(f"{h5_path} has no dataset.json entry with labels: {fix}")
        meta = read_entry(h5f, "dataset.json")
    pairs = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise UserError(f"{h5_path}: its dataset.json entry holds no [[name, label], ...] list under 'labels': {fix}")
    labels = dict(pairs)
    missing = [name for name in names if name not in labels]
    if missing:
        raise UserError(f"{h5_path}: dataset.json has no label for {len(missing)} of {len(names)} entries, "
                        f"first {missing[0]}: {fix}")
    return np.array([labels[name] for name in names], dtype=np.int64)


class ImageDataset(Dataset):
    """Images of DATA/images.h5: item i is (uint8 (3, H, W) tensor, int64 label), in name order."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        check_data_files(data_dir, [IMAGES_H5, IMAGES_JSON], f"preprocessing.py --output-path {data_dir}")
        self.h5_path = os.path.join(data_dir, IMAGES_H5)
        self.h5_json_path = os.path.join(data_dir, IMAGES_JSON)
        self.filelist = _list_entries(self.h5_json_path, ".png")
        self.labels = _read_labels(self.h5_path, self.filelist)
        self.h5 = LazyH5(self.h5_path)

    @functools.cached_property
    def image_size(self):
        """(H, W) of the images, read from the first one."""
        return png_size(self.h5_path, self.filelist[0])

    def __len__(self):
        return len(self.filelist)

    def __getitem__(self, index):
        image = read_entry(self.h5.get(), self.filelist[index])
        return torch.from_numpy(image), torch.tensor(self.labels[index])


class ImageLatentDataset(ImageDataset):
    """Images plus cached latents (DATA/NAME.h5): item i is (uint8 image, float32 (2C, h, w) mean-std, label)."""

    def __init__(self, data_dir, vae_latents_name="repae-invae-400k"):
        super().__init__(data_dir)
        latents_h5, latents_json = f"{vae_latents_name}.h5", f"{vae_latents_name}_h5.json"
        check_data_files(data_dir, [latents_h5, latents_json],
                         f"cache_latents.py --data-dir {data_dir} --output-dir {data_dir} "
                         f"--vae-latents-name {vae_latents_name}")
        latents_h5 = os.path.join(data_dir, latents_h5)
        self.feature_fnames = _list_entries(os.path.join(data_dir, latents_json), ".npy")
        self._check_pairs(latents_h5)
        # Labels come from the latents file (cache_latents.py copies them from images.h5).
        self.labels = _read_labels(latents_h5, self.feature_fnames)
        self.features_h5 = LazyH5(latents_h5)

    def _check_pairs(self, latents_h5):
        """Item i pairs image i with its own latent: the two lists must match one to one."""
        fix = f"write it again with {rewrite_hint(latents_h5)}"
        if len(self.filelist) != len(self.feature_fnames):
            raise UserError(f"{latents_h5} lists {len(self.feature_fnames)} latents but images.h5 lists "
                            f"{len(self.filelist)} images: {fix}")
        for image, latent in zip(self.filelist, self.feature_fnames):
            if latent_name(image) != latent:
                raise UserError(f"{latents_h5}: latent {latent} does not belong to image {image}: {fix}")

    @functools.cached_property
    def latent_shape(self):
        """(2C, h, w) of the cached posterior moments (mean then std), read from the first entry."""
        with open_h5(self.features_h5.path) as h5f:
            return tuple(h5f[self.feature_fnames[0]].shape)

    def __getitem__(self, index):
        image = read_entry(self.h5.get(), self.filelist[index])
        latent = read_entry(self.features_h5.get(), self.feature_fnames[index])
        return torch.from_numpy(image), torch.from_numpy(latent), torch.tensor(self.labels[index])
