"""visualize_latents.py: PCA pictures of latents against an independent numpy PCA, and the PNG grid."""
import numpy as np
import pytest
import torch
from PIL import Image

import visualize_latents
from dataset.h5 import ImageDataset
from helpers import TINY_VAE, assert_user_error, make_dataset, run_script
from models.autoencoder import vae_models
from utils.errors import report_user_errors
from visualize_latents import HEADER_HEIGHT, latent_pictures, pca_rgb
from weights.diffusers_format import export_diffusers_vae

ARCH = TINY_VAE


def numpy_pca_rgb(latents):
    """Projections on the top three covariance eigenvectors (largest loading positive), percentile-stretched."""
    batch, channels, height, width = latents.shape
    points = latents.transpose(0, 2, 3, 1).reshape(-1, channels).astype(np.float64)
    points -= points.mean(0)
    values, vectors = np.linalg.eigh(points.T @ points)
    components = vectors[:, np.argsort(values)[::-1][:3]]
    components *= np.sign(components[np.abs(components).argmax(0), range(3)])
    projections = points @ components
    low, high = np.quantile(projections, 0.01, axis=0), np.quantile(projections, 0.99, axis=0)
    rgb = np.clip((projections - low) / (high - low), 0, 1)
    return rgb.reshape(batch, height, width, 3).transpose(0, 3, 1, 2)


def test_pca_rgb_matches_numpy_pca():
    rng = np.random.default_rng(0)
    # four channels with clearly separated variances, mixed by a rotation
    latents = rng.standard_normal((3, 4, 5, 6)) * np.array([4.0, 2.0, 1.0, 0.3])[None, :, None, None]
    rotation, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    latents = np.einsum("dc,bchw->bdhw", rotation, latents)
    got = pca_rgb(torch.from_numpy(latents))
    assert got.shape == (3, 3, 5, 6) and got.dtype == torch.float32
    assert 0 <= got.min() and got.max() <= 1
    np.testing.assert_allclose(got.numpy(), numpy_pca_rgb(latents), atol=1e-5)
    # the picture ignores the latents' offset and scale
    np.testing.assert_allclose(pca_rgb(torch.from_numpy(5 * latents - 3)).numpy(), got.numpy(), atol=1e-5)


def test_pca_rgb_red_follows_the_main_direction():
    ramp = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    latents = torch.cat([3 * ramp, 0.1 * ramp.flip(-1), torch.zeros_like(ramp)], 1).double()
    red = pca_rgb(latents)[0, 0].flatten()
    assert torch.all(red[1:] >= red[:-1]) and red[0] == 0 and red[-1] == 1


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("visualize"), resolution=32, classes=2, per_class=2)


@pytest.mark.slow
def test_visualize_latents_command(tmp_path, data_dir):
    vaes = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        vaes.append(vae_models[ARCH]().eval())
    torch.save(vaes[0].state_dict(), tmp_path / "before.pt")
    export_diffusers_vae(vaes[1], ARCH, tmp_path / "after")
    output = tmp_path / "grid" / "pca.png"
    result = run_script("visualize_latents.py", "--vae", ARCH, "--vae-ckpt", tmp_path / "before.pt",
                        tmp_path / "after", "--data-dir", data_dir, "--num-images", 3, "--start-index", 1,
                        "--output", output, "--device", "cpu")
    assert str(output) in result.stdout

    grid = np.asarray(Image.open(output).convert("RGB"))
    assert grid.shape == (HEADER_HEIGHT + 3 * 32, 3 * 32, 3)
    tiles = grid[HEADER_HEIGHT:].reshape(3, 32, 3, 32, 3).transpose(2, 0, 4, 1, 3)  # (column, row, 3, 32, 32)
    dataset = ImageDataset(data_dir)
    images = torch.stack([dataset[i][0] for i in (1, 2, 3)])
    np.testing.assert_array_equal(tiles[0], images.numpy())
    for column, vae in zip(tiles[1:], vaes):
        expected = latent_pictures(vae, images, "cpu").numpy().astype(int)
        assert np.abs(column.astype(int) - expected).max() <= 1
        # the latent grid is 4x4 upsampled to 32x32: constant 8x8 blocks
        np.testing.assert_array_equal(column, np.repeat(np.repeat(column[..., ::8, ::8], 8, -1), 8, -2))
    assert not np.array_equal(tiles[1], tiles[2])


@pytest.mark.parametrize("flags, message", [
    (["--vae", "f9d9"], "--vae f9d9 is unknown; known: f8d4, f16d32"),
    (["--vae-ckpt", "nothere.pt"], "--vae-ckpt nothere.pt: no such file or folder"),
    (["--start-index", "4"], "--start-index 4 is past the 4 images of"),
])
def test_visualize_latents_bad_input_ends_with_one_line(tmp_path, data_dir, flags, message):
    argv = ["--vae", ARCH, "--vae-ckpt", "none", "--data-dir", str(data_dir), "--output", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(visualize_latents.main)(argv + flags)
    assert str(exit_info.value).startswith("error: " + message) and "\n" not in str(exit_info.value)
    assert not (tmp_path / "x.png").exists()


def test_visualize_latents_cuda_without_gpu_ends_with_one_line(tmp_path, monkeypatch, data_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(visualize_latents.main)(["--vae", ARCH, "--vae-ckpt", "none", "--data-dir", str(data_dir),
                                                    "--output", str(tmp_path / "x.png"), "--device", "cuda"])
    assert str(exit_info.value) == "error: --device cuda: no CUDA device is available here; pass --device cpu"
    assert not (tmp_path / "x.png").exists()


def test_visualize_latents_missing_or_truncated_data(tmp_path, data_dir):
    with pytest.raises(SystemExit, match=r"--data-dir .*: holds no images\.h5 and no images_h5\.json; "
                                         r"run preprocessing\.py --output-path"):
        report_user_errors(visualize_latents.main)(["--vae", ARCH, "--vae-ckpt", "none", "--data-dir", str(tmp_path)])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "images_h5.json").write_bytes((data_dir / "images_h5.json").read_bytes())
    content = (data_dir / "images.h5").read_bytes()
    (damaged / "images.h5").write_bytes(content[:len(content) // 2])  # a copy cut short
    result = run_script("visualize_latents.py", "--vae", ARCH, "--vae-ckpt", "none", "--data-dir", damaged,
                        "--output", tmp_path / "x.png", check=False)
    assert_user_error(result, damaged / "images.h5", "damaged or truncated",
                      f"preprocessing.py --output-path {damaged} --overwrite")
    assert not (tmp_path / "x.png").exists()
