"""utils/data.py: the HDF5 datasets (lazy per-worker handles, clear errors) and the resumable sampler."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import preprocessing
from dataset.h5 import ImageDataset, ImageLatentDataset, latent_name, read_entry
from dataset.sampler import ResumableDistributedSampler
from helpers import make_photo_tree
from utils.errors import UserError

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def write_latents(data_dir, name, latents, labels, names):
    """A NAME.h5 / NAME_h5.json pair in the cache_latents.py layout."""
    with h5py.File(data_dir / f"{name}.h5", "w") as h5f:
        for entry, latent in zip(names, latents):
            h5f.create_dataset(entry, data=latent)
        h5f.create_dataset("dataset.json", data=np.array(json.dumps({"labels": labels}).encode(), dtype="S"))
    (data_dir / f"{name}_h5.json").write_text(json.dumps(list(names) + ["dataset.json"]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """images.h5 of five 32-px photos in two classes, plus matching random latents `lat`."""
    tmp = tmp_path_factory.mktemp("data")
    arrays = make_photo_tree(tmp / "src", photos=PHOTOS, classes=("a", "b"))
    preprocessing.main(["--imagenet-path", str(tmp / "src"), "--output-path", str(tmp / "data"),
                        "--num-workers", "1", "--resolution", "32"])
    paths = sorted(arrays, key=lambda p: p.relative_to(tmp / "src").as_posix())
    images = [preprocessing.center_crop_arr(arrays[p], 32).transpose(2, 0, 1) for p in paths]
    labels = [0 if p.parent.name == "a" else 1 for p in paths]
    names = [latent_name(f"00000/img{i:08d}.png") for i in range(len(paths))]
    latents = np.random.default_rng(0).standard_normal((len(paths), 8, 4, 4)).astype(np.float32)
    write_latents(tmp / "data", "lat", latents, [[n, label] for n, label in zip(names, labels)], names)
    return tmp / "data", images, labels, latents


def test_latent_name():
    """Latent entries are named after their image, as the published cache_latents.py does."""
    assert latent_name("00012/img00012345.png") == "00012/img-mean-std-00012345.npy"


def test_image_dataset_items_and_lazy_open(data):
    """Items are (uint8 CHW image, int64 label) in file order; the file is not opened by the constructor."""
    data_dir, images, labels, _ = data
    dataset = ImageDataset(str(data_dir))
    assert dataset.h5._file is None
    assert len(dataset) == 5
    for i in range(5):
        image, label = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert label.dtype == torch.int64 and label.item() == labels[i]
        np.testing.assert_array_equal(image.numpy(), images[i])


def test_image_size_from_the_first_image_header(data):
    """Both datasets give the image resolution without opening a handle that DataLoader workers would inherit."""
    data_dir = data[0]
    images, pairs = ImageDataset(str(data_dir)), ImageLatentDataset(str(data_dir), vae_latents_name="lat")
    assert images.image_size == pairs.image_size == (32, 32)
    assert images.h5._file is None and pairs.h5._file is None and pairs.features_h5._file is None


def test_two_worker_dataloader_reads_everything(data):
    """Two DataLoader workers each open their own handle and together return every item once."""
    data_dir, images, labels, latents = data
    dataset = ImageLatentDataset(str(data_dir), vae_latents_name="lat")
    dataset[0]  # a handle opened before the fork must not be shared with the workers
    loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    got_images, got_latents, got_labels = map(torch.cat, zip(*loader))
    np.testing.assert_array_equal(got_images.numpy(), np.stack(images))
    assert got_latents.dtype == torch.float32 and got_latents.shape == (5, 8, 4, 4)
    np.testing.assert_array_equal(got_latents.numpy(), latents)
    assert got_labels.tolist() == labels


def test_missing_files_name_the_flag_and_the_fix(tmp_path, data):
    """A missing folder or file names --data-dir and the command that writes it, before anything is opened."""
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"--data-dir {missing}: no such folder; run preprocessing.py --output-path "
                                        f"{missing} to make it"):
        ImageDataset(str(missing))
    with pytest.raises(UserError, match=f"--data-dir {tmp_path}: holds no images.h5 and no images_h5.json; "
                                        f"run preprocessing.py --output-path {tmp_path}$"):
        ImageDataset(str(tmp_path))
    with pytest.raises(UserError, match=r"--data-dir .*: no such folder; run preprocessing\.py"):
        ImageLatentDataset(str(missing), vae_latents_name="lat")
    with pytest.raises(UserError, match=f"--data-dir {data[0]}: holds no nope.h5 and no nope_h5.json; run "
                                        f"cache_latents.py --data-dir {data[0]} --output-dir {data[0]} "
                                        "--vae-latents-name nope"):
        ImageLatentDataset(str(data[0]), vae_latents_name="nope")


def copy_data(data_dir, folder, names=("images.h5", "images_h5.json", "lat.h5", "lat_h5.json")):
    """A copy of some files of the data folder; returns the copy's folder."""
    folder.mkdir()
    for name in names:
        shutil.copy(data_dir / name, folder / name)
    return folder


def cut_short(path):
    """Truncate a file to half its size, as an interrupted copy leaves it."""
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])


def test_truncated_files_are_named_with_the_command_that_writes_them(tmp_path, data):
    images = copy_data(data[0], tmp_path / "images")
    cut_short(images / "images.h5")
    with pytest.raises(UserError, match=f"{images / 'images.h5'} is damaged or truncated .*write it again with "
                                        f"preprocessing.py --output-path {images} --overwrite"):
        ImageDataset(str(images))
    latents = copy_data(data[0], tmp_path / "latents")
    cut_short(latents / "lat.h5")
    with pytest.raises(UserError, match=f"{latents / 'lat.h5'} is damaged or truncated .*write it again with "
                                        f"cache_latents.py --output-dir {latents} --vae-latents-name lat --overwrite"):
        ImageLatentDataset(str(latents), vae_latents_name="lat")


@pytest.mark.parametrize("name, content, message", [
    ("images_h5.json", "[\"00000/img00000000.png\", ", r"images_h5\.json is not valid JSON"),
    ("images_h5.json", "{\"00000/img00000000.png\": 1}", r"images_h5\.json is not a JSON list of entry names"),
    ("lat_h5.json", "", r"lat_h5\.json is not valid JSON .*cache_latents\.py"),
    ("lat_h5.json", "[\"dataset.json\"]", r"lat_h5\.json lists no \.npy entries"),
])
def test_malformed_name_lists_are_named(tmp_path, data, name, content, message):
    folder = copy_data(data[0], tmp_path / "data")
    (folder / name).write_text(content)
    with pytest.raises(UserError, match=message):
        ImageLatentDataset(str(folder), vae_latents_name="lat")


@pytest.mark.parametrize("labels, message", [
    (b'{"labels": [["00000/img00000000.png", 0]', r"images\.h5: entry dataset\.json cannot be read \(JSONDecodeError"),
    (b'{"classes": 2}', r"images\.h5: its dataset\.json entry holds no \[\[name, label\], \.\.\.\] list"),
])
def test_malformed_labels_entry_is_named(tmp_path, data, labels, message):
    folder = copy_data(data[0], tmp_path / "data", names=("images.h5", "images_h5.json"))
    with h5py.File(folder / "images.h5", "a") as h5f:
        del h5f["dataset.json"]
        h5f.create_dataset("dataset.json", data=np.array(labels, dtype="S"))
    with pytest.raises(UserError, match=message + ".*preprocessing.py --output-path"):
        ImageDataset(str(folder))


def test_missing_label_is_reported(tmp_path):
    """An image without a label in dataset.json is named in the error."""
    png = (tmp_path / "x.png")
    Image.new("RGB", (4, 4)).save(png)
    names = ["00000/img00000000.png", "00000/img00000001.png"]
    with h5py.File(tmp_path / "images.h5", "w") as h5f:
        for name in names:
            h5f.create_dataset(name, data=np.array(png.read_bytes(), dtype="S"))
        labels = json.dumps({"labels": [[names[0], 3]]}).encode()
        h5f.create_dataset("dataset.json", data=np.array(labels, dtype="S"))
    (tmp_path / "images_h5.json").write_text(json.dumps(["00000", *names, "dataset.json"]))
    with pytest.raises(UserError, match=r"no label for 1 of 2 entries, first 00000/img00000001\.png"):
        ImageDataset(str(tmp_path))


def test_mismatched_image_and_latent_lists(tmp_path, data):
    """Latents that do not pair one to one with the images are refused."""
    data_dir, _, labels, latents = data
    for name in ("images.h5", "images_h5.json"):
        shutil.copy(data_dir / name, tmp_path / name)
    names = [latent_name(f"00000/img{i:08d}.png") for i in range(5)]
    write_latents(tmp_path, "short", latents[:4], [[n, 0] for n in names[:4]], names[:4])
    with pytest.raises(ValueError, match="lists 4 latents but images.h5 lists 5 images"):
        ImageLatentDataset(str(tmp_path), vae_latents_name="short")
    shifted = [latent_name(f"00000/img{i:08d}.png") for i in range(1, 6)]
    write_latents(tmp_path, "shifted", latents, [[n, 0] for n in shifted], shifted)
    with pytest.raises(ValueError, match=r"img-mean-std-00000001\.npy does not belong to image 00000/img00000000"):
        ImageLatentDataset(str(tmp_path), vae_latents_name="shifted")
    write_latents(tmp_path, "unlabelled", latents, [[n, 0] for n in names[1:]], names)
    with pytest.raises(ValueError, match=r"no label for 1 of 5 entries, first 00000/img-mean-std-00000000\.npy"):
        ImageLatentDataset(str(tmp_path), vae_latents_name="unlabelled")


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_matches_torch_distributed_sampler(shuffle, drop_last):
    """From the start of an epoch the order is exactly torch's DistributedSampler order."""
    for rank in range(3):
        ours = ResumableDistributedSampler(_Sized(11), 3, rank, seed=5, shuffle=shuffle, drop_last=drop_last)
        theirs = DistributedSampler(_Sized(11), 3, rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        ours.set_epoch(2)
        theirs.set_epoch(2)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_sampler_partitions_and_reshuffles():
    """Ranks get disjoint equal shares; epochs give different orders, the same epoch the same one."""
    samplers = [ResumableDistributedSampler(_Sized(10), 2, r, seed=0) for r in range(2)]
    shares = [list(s) for s in samplers]
    assert len(shares[0]) == len(shares[1]) == 5 and set(shares[0]).isdisjoint(shares[1])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != shares[0]
    samplers[0].set_epoch(0)
    assert list(samplers[0]) == shares[0]


def test_sampler_resumes_mid_epoch(data):
    """start_index skips the batches already trained on; the DataLoader yields the rest of the same epoch."""
    dataset = ImageDataset(str(data[0]))
    sampler = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, seed=3)
    sampler.set_epoch(4)
    full = [labels.tolist() for _, labels in DataLoader(dataset, batch_size=2, sampler=sampler)]
    order = list(sampler)
    sampler.set_epoch(4, start_index=2)
    assert list(sampler) == order[2:] and len(sampler) == 3
    assert [labels.tolist() for _, labels in DataLoader(dataset, batch_size=2, sampler=sampler)] == \
        [sum(full, [])[2:4], sum(full, [])[4:]]
    with pytest.raises(ValueError, match="start_index 6 is outside"):
        sampler.set_epoch(4, start_index=6)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        ResumableDistributedSampler(dataset, num_replicas=2, rank=2)


def test_damaged_entry_error_names_file_and_entry(tmp_path):
    path = tmp_path / "images.h5"
    with h5py.File(path, "w") as h5f:
        h5f.create_dataset("00000/img00000000.png", data=np.void(b"\x89PNG truncated"))
    with h5py.File(path, "r") as h5f, pytest.raises(UserError, match="images.h5: entry 00000/img00000000.png"):
        read_entry(h5f, "00000/img00000000.png")
