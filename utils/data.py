"""Datasets over the packed HDF5 files (images.h5 and the cached latents NAME.h5) and a resumable sampler.

Files (written by preprocessing.py and cache_latents.py):
  DATA/images.h5       `00000/img00000000.png` uncompressed PNG bytes per image, `dataset.json` labels
  DATA/images_h5.json  list of the names in images.h5
  DATA/NAME.h5         `00000/img-mean-std-00000000.npy` float32 (2C, h, w): posterior mean then std
  DATA/NAME_h5.json    list of the names in NAME.h5
"""
import functools
import io
import json
import os

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler


def latent_name(image_name):
    """Latent entry of an image entry: 00000/img00000012.png -> 00000/img-mean-std-00000012.npy."""
    folder, base = os.path.split(image_name)
    return f"{folder}/{base.replace('img', 'img-mean-std-', 1).replace('.png', '.npy')}"


def read_entry(h5f, name):
    """Decode one entry: .png -> uint8 (C, H, W) array, .json -> object, .npy -> array; errors name file and entry."""
    try:
        return _decode_entry(h5f, name)
    except Exception as error:
        raise RuntimeError(f"{h5f.filename}: entry {name} cannot be read ({type(error).__name__}: {error}); "
                           "the file is damaged: write it again with preprocessing.py / cache_latents.py") from error


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
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def __getstate__(self):
        """Pickle (spawned workers) without the open handle."""
        return {"path": self.path, "_file": None, "_pid": None}


def png_size(h5_path, name):
    """(H, W) of the PNG entry `name`, read from its header (no decoding)."""
    with h5py.File(h5_path, "r") as h5f, Image.open(io.BytesIO(h5f[name][()])) as image:
        width, height = image.size
    return height, width


def _list_entries(json_path, extension, hint):
    """Sorted names with the given extension from a NAME_h5.json list."""
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"{json_path} not found; {hint}")
    with open(json_path) as f:
        names = json.load(f)
    return sorted(name for name in set(names) if name.endswith(extension))


def _read_labels(h5_path, names, hint):
    """int64 label of every name from the dataset.json entry of h5_path."""
    if not os.path.isfile(h5_path):
        raise FileNotFoundError(f"{h5_path} not found; {hint}")
    with h5py.File(h5_path, "r") as h5f:
        if "dataset.json" not in h5f:
            raise ValueError(f"{h5_path} has no dataset.json entry with labels")
        labels = dict(read_entry(h5f, "dataset.json")["labels"] or [])
    missing = [name for name in names if name not in labels]
    if missing:
        raise ValueError(f"{h5_path}: dataset.json has no label for {len(missing)} of {len(names)} entries, "
                         f"first {missing[0]}")
    return np.array([labels[name] for name in names], dtype=np.int64)


class ImageDataset(Dataset):
    """Images of DATA/images.h5: item i is (uint8 (3, H, W) tensor, int64 label), in name order."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        self.h5_path = os.path.join(data_dir, "images.h5")
        self.h5_json_path = os.path.join(data_dir, "images_h5.json")
        hint = "run preprocessing.py first"
        self.filelist = _list_entries(self.h5_json_path, ".png", hint)
        self.labels = _read_labels(self.h5_path, self.filelist, hint)
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


class ImageLatentDataset(Dataset):
    """Images plus cached latents (DATA/NAME.h5): item i is (uint8 image, float32 (2C, h, w) mean-std, label)."""

    def __init__(self, data_dir, vae_latents_name="repae-invae-400k"):
        self.data_dir = data_dir
        self.images_h5_path = os.path.join(data_dir, "images.h5")
        latents_h5 = os.path.join(data_dir, f"{vae_latents_name}.h5")
        self.image_fnames = _list_entries(os.path.join(data_dir, "images_h5.json"), ".png",
                                          "run preprocessing.py first")
        self.feature_fnames = _list_entries(os.path.join(data_dir, f"{vae_latents_name}_h5.json"), ".npy",
                                            "run cache_latents.py first")
        if not os.path.isfile(self.images_h5_path):
            raise FileNotFoundError(f"{self.images_h5_path} not found; run preprocessing.py first")
        self._check_pairs(latents_h5)
        # Labels come from the latents file (cache_latents.py copies them from images.h5).
        self.labels = _read_labels(latents_h5, self.feature_fnames, "run cache_latents.py first")
        self.images_h5, self.features_h5 = LazyH5(self.images_h5_path), LazyH5(latents_h5)

    def _check_pairs(self, latents_h5):
        """Item i pairs image i with its own latent: the two lists must match one to one."""
        if len(self.image_fnames) != len(self.feature_fnames):
            raise ValueError(f"{latents_h5} lists {len(self.feature_fnames)} latents but images.h5 lists "
                             f"{len(self.image_fnames)} images; re-run cache_latents.py on these images")
        for image, latent in zip(self.image_fnames, self.feature_fnames):
            if latent_name(image) != latent:
                raise ValueError(f"{latents_h5}: latent {latent} does not belong to image {image}; "
                                 f"re-run cache_latents.py on these images")

    @functools.cached_property
    def image_size(self):
        """(H, W) of the images, read from the first one."""
        return png_size(self.images_h5_path, self.image_fnames[0])

    def __len__(self):
        return len(self.feature_fnames)

    def __getitem__(self, index):
        image = read_entry(self.images_h5.get(), self.image_fnames[index])
        latent = read_entry(self.features_h5.get(), self.feature_fnames[index])
        return torch.from_numpy(image), torch.from_numpy(latent), torch.tensor(self.labels[index])


class ResumableDistributedSampler(Sampler):
    """torch's DistributedSampler order (seed + epoch shuffle, rank::num_replicas) that can start mid-epoch.

    Resume at local batch b of an epoch with `set_epoch(epoch, start_index=b * local_batch_size)`.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0, shuffle=True, drop_last=True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.dataset_size = len(dataset)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        if drop_last:
            self.num_samples = self.dataset_size // num_replicas
        else:
            self.num_samples = -(-self.dataset_size // num_replicas)
        if self.num_samples == 0:
            raise ValueError(f"{self.dataset_size} samples cannot feed {num_replicas} processes")
        self.total_size = self.num_samples * num_replicas
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch, start_index=0):
        """Select the epoch's order; skip this rank's first start_index samples of it."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} is outside [0, {self.num_samples}]")
        self.epoch, self.start_index = epoch, start_index

    def epoch_indices(self):
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_size))
        if self.drop_last:
            indices = indices[:self.total_size]
        else:  # pad by repeating from the start, as DistributedSampler does
            indices = (indices * (-(-self.total_size // len(indices))))[:self.total_size]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return iter(self.epoch_indices()[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index
