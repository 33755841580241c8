"""cache_latents.py: every image encoded once, in order, in the published NAME.h5 layout, under 2 processes."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

import cache_latents
import preprocessing
from dataset.h5 import ImageDataset, ImageLatentDataset, latent_name
from helpers import assert_user_error, file_mode, make_photo_tree, run_script, umask
from utils.errors import UserError
from weights.vae import load_vae


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """images.h5 of five 32-px photos in two classes."""
    tmp = tmp_path_factory.mktemp("cache")
    make_photo_tree(tmp / "src", photos=("astronaut", "chelsea", "coffee", "rocket", "camera"), classes=("a", "b"))
    preprocessing.main(["--imagenet-path", str(tmp / "src"), "--output-path", str(tmp / "data"),
                        "--num-workers", "1", "--resolution", "32"])
    return tmp / "data"


@pytest.mark.parametrize("num_items,batch_size,world", [(5, 2, 2), (7, 3, 4), (1, 128, 8), (256, 128, 2)])
def test_rank_slices_cover_each_index_once_in_order(num_items, batch_size, world):
    """Per step the ranks' slices are contiguous, rank-ordered and together cover every index exactly once."""
    per_rank = [cache_latents.rank_slices(num_items, batch_size, world, r) for r in range(world)]
    assert len({len(s) for s in per_rank}) == 1  # every rank runs the same number of steps (collectives)
    order = [i for step in zip(*per_rank) for s in step for i in s]
    assert order == list(range(num_items))


def test_refuses_to_overwrite(tmp_path):
    """An existing latents file is named in the error before any work starts."""
    (tmp_path / "x.h5").write_bytes(b"old")
    with pytest.raises(UserError, match=r"x\.h5 already exists; pass --overwrite"):
        cache_latents.main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path), "--vae-latents-name", "x"])
    assert (tmp_path / "x.h5").read_bytes() == b"old"


def test_missing_data_folder_ends_with_one_line(tmp_path):
    missing = tmp_path / "data"
    result = run_script("cache_latents.py", "--vae-random-init", "--data-dir", missing, "--output-dir", tmp_path,
                        check=False, cwd=tmp_path)
    assert_user_error(result, f"--data-dir {missing}: no such folder; run preprocessing.py --output-path {missing}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_processes_match_a_direct_encode(images_dir):
    """torchrun with 2 gloo processes writes each image's mean and std once, in dataset order."""
    with umask(0o022):
        run_script("cache_latents.py", "--vae-arch", "f8d4", "--vae-random-init", "--data-dir", images_dir,
                   "--output-dir", images_dir, "--vae-latents-name", "rnd", "--pproc-batch-size", 2,
                   "--num-workers", 1, nproc=2, timeout=300)
    assert sorted(os.listdir(images_dir)) == ["images.h5", "images_h5.json", "rnd.h5", "rnd_h5.json"]
    assert file_mode(images_dir / "rnd.h5") == file_mode(images_dir / "rnd_h5.json") == 0o644  # not private

    images = ImageDataset(str(images_dir))
    names = [latent_name(n) for n in images.filelist]
    assert json.loads((images_dir / "rnd_h5.json").read_text()) == names + ["dataset.json"]
    with h5py.File(images_dir / "rnd.h5", "r") as h5f:
        labels = json.loads(h5f["dataset.json"][()].decode())["labels"]
        stored = np.stack([h5f[n][()] for n in names])
    assert labels == [[n, int(label)] for n, label in zip(names, images.labels)]
    assert stored.dtype == np.float32 and stored.shape == (5, 8, 4, 4)

    vae = load_vae("f8d4", "none", require_stats=False, seed=0)[0].eval()  # what --vae-random-init draws
    x = torch.stack([images[i][0] for i in range(len(images))])
    with torch.no_grad():
        posterior = vae.encode(x.float() / 127.5 - 1)
    np.testing.assert_allclose(stored[:, :4], posterior.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stored[:, 4:], posterior.std.numpy(), rtol=1e-4, atol=1e-5)

    pairs = ImageLatentDataset(str(images_dir), vae_latents_name="rnd")
    image, latent, label = pairs[4]
    assert torch.equal(image, images[4][0]) and label == images[4][1]
    np.testing.assert_array_equal(latent.numpy(), stored[4])


@pytest.mark.slow
def test_failure_mid_run_leaves_no_output(images_dir, tmp_path):
    """A corrupt image met after some latents were written leaves neither output nor temporary files."""
    for name in ("images.h5", "images_h5.json"):
        shutil.copy(images_dir / name, tmp_path / name)
    with h5py.File(tmp_path / "images.h5", "a") as h5f:
        del h5f["00000/img00000003.png"]
        h5f.create_dataset("00000/img00000003.png", data=np.array(b"not a png", dtype="S"))
    run = run_script("cache_latents.py", "--vae-arch", "f8d4", "--vae-random-init", "--data-dir", tmp_path,
                     "--output-dir", tmp_path, "--vae-latents-name", "rnd", "--pproc-batch-size", 2,
                     "--num-workers", 0, check=False, timeout=300)
    assert run.returncode != 0 and "UnidentifiedImageError" in run.stderr
    assert sorted(os.listdir(tmp_path)) == ["images.h5", "images_h5.json"]
