"""eval_vae.py: PSNR, SSIM, LPIPS, rFID and latent statistics of VAEs in every form, checked independently."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.metrics import structural_similarity

import eval_vae
from dataset.h5 import ImageDataset
from evaluation.inception import InceptionV3
from evaluation.reconstruction import psnr
from helpers import TINY_VAE, assert_user_error, cheap_frechet, make_dataset, run_script, use_cheap_frechet
from loss.lpips import build_lpips
from models.autoencoder import preprocess_imgs_vae, to_uint8, vae_models
from utils.errors import report_user_errors
from weights.diffusers_format import export_diffusers_vae

ARCH = TINY_VAE


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("eval_vae"), resolution=32, classes=2, per_class=2)


@pytest.fixture(scope="module")
def images(data_dir):
    dataset = ImageDataset(data_dir)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def random_vae(seed):
    """A randomly initialised f8d4-pico VAE."""
    torch.manual_seed(seed)
    return vae_models[ARCH]().eval()


def gray_vae():
    """A VAE that decodes every latent to 0, i.e. mid-gray pixels (127): its reconstructions are known exactly."""
    vae = random_vae(0)
    torch.nn.init.zeros_(vae.decoder.conv_out.weight)
    torch.nn.init.zeros_(vae.decoder.conv_out.bias)
    return vae


def latent_channel_stats(vae, images):
    """Per-channel mean and population std of the posterior means."""
    with torch.no_grad():
        z = vae.encode(preprocess_imgs_vae(images)).mean.double()
    return z.mean(dim=(0, 2, 3)).tolist(), z.std(dim=(0, 2, 3), unbiased=False).tolist()


@pytest.mark.slow
def test_eval_vae_command_against_independent_numbers(tmp_path, data_dir, images, inception_weights, monkeypatch):
    from torchmetrics.functional.image import structural_similarity_index_measure  # slow to import: only here

    use_cheap_frechet(monkeypatch)  # evaluate.py's test checks the Frechet distance itself at this size
    vae = gray_vae()
    torch.save(vae.state_dict(), tmp_path / "gray.pt")
    run_script("eval_vae.py", "--vae", ARCH, "--vae-ckpt", tmp_path / "gray.pt", "--data-dir", data_dir,
               "--inception-weights", inception_weights, "--lpips-random-init", "--batch-size", 3, "--num-workers", 0,
               "--device", "cpu", "--json", tmp_path / "out.json", env={"OMP_NUM_THREADS": "2"})
    got = json.loads((tmp_path / "out.json").read_text())[str(tmp_path / "gray.pt")]

    gray = torch.full_like(images, 127)
    mse = (images.double() - 127).pow(2).mean(dim=(1, 2, 3))
    assert got["psnr"] == pytest.approx((10 * torch.log10(255 ** 2 / mse)).mean().item(), rel=1e-9)
    ssim = structural_similarity_index_measure(gray.float(), images.float(), data_range=255.0, reduction="none")
    assert got["ssim"] == pytest.approx(ssim.mean().item(), rel=1e-5, abs=1e-6)
    ssim_skimage = np.mean([structural_similarity(
        gray[i].permute(1, 2, 0).numpy(), images[i].permute(1, 2, 0).numpy(), data_range=255, channel_axis=2,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False) for i in range(len(images))])
    assert got["ssim"] == pytest.approx(ssim_skimage, abs=0.02)  # another SSIM implementation (borders differ)
    torch.manual_seed(0)  # the script's random LPIPS trunk
    lpips = build_lpips(pretrained_trunk=False)
    with torch.no_grad():
        expected_lpips = lpips(preprocess_imgs_vae(gray), preprocess_imgs_vae(images)).mean().item()
    assert got["lpips"] == pytest.approx(expected_lpips, rel=1e-4)
    # rFID of constant reconstructions: the statistics of the originals against a zero covariance
    net = InceptionV3(inception_weights)
    original_pool = net.activations(images.permute(0, 2, 3, 1))[0].astype(np.float64)
    gray_pool = net.activations(gray[:1].permute(0, 2, 3, 1))[0][0]
    expected_rfid = cheap_frechet(original_pool.mean(0), np.cov(original_pool, rowvar=False), gray_pool,
                                  np.zeros((2048, 2048)))
    assert got["rfid"] == pytest.approx(expected_rfid, rel=1e-3)
    mean, std = latent_channel_stats(vae, images)
    np.testing.assert_allclose(got["latent_mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["latent_std"], std, rtol=1e-5)
    assert got["num_images"] == len(images) == 4


@pytest.mark.slow
def test_eval_vae_compares_vae_forms_in_one_table(tmp_path, data_dir, images, capsys):
    first, second = random_vae(1), random_vae(2)
    torch.save(first.state_dict(), tmp_path / "first.pt")
    export_diffusers_vae(first, ARCH, tmp_path / "first-diffusers")
    save_file(second.state_dict(), str(tmp_path / "second.safetensors"))
    ckpts = [str(tmp_path / name) for name in ("first.pt", "first-diffusers", "second.safetensors")]
    results = eval_vae.main(["--vae", ARCH, "--vae-ckpt", *ckpts, "--data-dir", str(data_dir), "--no-rfid",
                             "--lpips-random-init", "--num-workers", "0", "--num-images", "3", "--device", "cpu",
                             "--json", str(tmp_path / "out.json")])
    assert list(results) == ckpts
    assert json.loads((tmp_path / "out.json").read_text()) == results
    table = capsys.readouterr().out
    assert all(name in table for name in ckpts) and "PSNR" in table and "rFID" in table

    pt, diffusers, other = results.values()
    for key in ("psnr", "ssim", "lpips", "latent_mean", "latent_std"):
        np.testing.assert_allclose(diffusers[key], pt[key], rtol=1e-5, atol=1e-6)  # one VAE, two forms
    assert other["psnr"] != pytest.approx(pt["psnr"]) and other["latent_mean"] != pytest.approx(pt["latent_mean"])
    assert pt["rfid"] is None and pt["num_images"] == 3
    for vae, result in ((first, pt), (second, other)):
        mean, std = latent_channel_stats(vae, images[:3])
        np.testing.assert_allclose(result["latent_mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result["latent_std"], std, rtol=1e-5)
        with torch.no_grad():
            reconstructions = to_uint8(vae.decode(vae.encode(preprocess_imgs_vae(images[:3])).mode()))
        assert result["psnr"] == pytest.approx(psnr(reconstructions, images[:3]).mean().item(), rel=1e-6)


@pytest.mark.parametrize("name, message", [
    ("nothere.pt", "--vae-ckpt {ckpt}: no such file or folder"),
    ("f16d32.pt", "--vae-ckpt {ckpt}: {ckpt} does not fit AutoencoderKL: check --vae {ARCH} against the checkpoint"),
    ("training.pt", "--vae-ckpt {ckpt}: {ckpt} holds a REPA-E training checkpoint (keys model, ema, vae, args), "
                    "not a VAE state dict: extract it with save_vae_weights.py"),
    ("text.pt", "--vae-ckpt {ckpt}: {ckpt} is not a PyTorch or safetensors checkpoint"),
])
def test_eval_vae_bad_checkpoint_ends_with_one_line(tmp_path, data_dir, name, message):
    ckpt = tmp_path / name
    if name == "f16d32.pt":
        torch.save(vae_models["f16d32-tiny"]().state_dict(), ckpt)
    elif name == "training.pt":
        vae = random_vae(0).state_dict()
        torch.save({"model": {}, "ema": {}, "vae": vae, "args": {}}, ckpt)
    elif name == "text.pt":
        ckpt.write_text("a note, not weights")
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(eval_vae.main)(["--vae", ARCH, "--vae-ckpt", str(ckpt), "--data-dir", str(data_dir),
                                           "--no-rfid", "--lpips-random-init", "--num-workers", "0", "--device", "cpu"])
    assert str(exit_info.value).startswith("error: " + message.format(ckpt=ckpt, ARCH=ARCH))
    assert "\n" not in str(exit_info.value)


@pytest.mark.parametrize("flags, message", [
    (["--no-rfid"], "LPIPS needs the torchvision VGG16 weights vgg16-397923af.pth, not found at "
                    "{torch}/hub/checkpoints/vgg16-397923af.pth: put the file there (set TORCH_HOME to use another "
                    "cache), or pass --lpips-random-init (smoke runs)"),
    pytest.param(["--lpips-random-init"],
                 "at the file, or pass --no-rfid (no rFID) or --inception-random-init (smoke runs)",
                 marks=pytest.mark.slow),  # builds LPIPS before it finds no Inception weights
])
def test_eval_vae_missing_weights_name_the_flags_that_skip_them(tmp_path, monkeypatch, data_dir, flags, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("REPAE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning, match="randomly initialised VAE"):
        report_user_errors(eval_vae.main)(["--vae", ARCH, "--vae-ckpt", "none", "--data-dir", str(data_dir),
                                           "--num-workers", "0", "--device", "cpu", *flags])
    assert str(exit_info.value).startswith("error: ")
    assert message.format(torch=tmp_path / "torch") in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_eval_vae_cuda_without_gpu_ends_with_one_line(monkeypatch, data_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(eval_vae.main)(["--vae", ARCH, "--vae-ckpt", "none", "--data-dir", str(data_dir),
                                           "--no-rfid", "--lpips-random-init", "--num-workers", "0",
                                           "--device", "cuda"])
    assert str(exit_info.value) == "error: --device cuda: no CUDA device is available here; pass --device cpu"


def test_eval_vae_missing_data(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_script("eval_vae.py", "--vae", ARCH, "--vae-ckpt", "none", "--data-dir", missing, "--no-rfid",
                        "--lpips-random-init", "--device", "cpu", "--json", tmp_path / "out.json", check=False,
                        cwd=tmp_path)
    assert_user_error(result, f"--data-dir {missing}: no such folder; run preprocessing.py --output-path {missing}")
    assert sorted(tmp_path.iterdir()) == []
