"""Checkpoints named by Hugging Face hub id, resolved offline from a hand-made hub cache."""
import argparse

import pytest
import torch
from huggingface_hub import constants

import generate
import save_vae_weights
from helpers import TINY_VAE, tiny_sit, training_checkpoint
from models.autoencoder import vae_models
from utils.errors import UserError
from weights.diffusers_format import export_diffusers_vae
from weights.hub import DIFFUSERS_FILES, DIFFUSERS_STATS, HUB_DEFAULT_FILES, resolve_weights
from weights.vae import load_vae

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SIT_FILE = HUB_DEFAULT_FILES["REPA-E/sit-repae-vavae"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path/hub that huggingface_hub and resolve_weights use (offline: conftest)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def add_repo(cache, repo_id, files):
    """Write {path in repo: object (torch.save) or folder writer fn} as the cached snapshot of repo_id at main."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    snapshot = storage / "snapshots" / COMMIT
    for name, content in files.items():
        path = snapshot / name
        path.parent.mkdir(parents=True, exist_ok=True)
        content(snapshot) if callable(content) else torch.save(content, path)
    return snapshot


def tiny_vae(seed):
    """An f8d4-pico VAE with seeded weights."""
    torch.manual_seed(seed)
    return vae_models[TINY_VAE]()


def stats(value):
    """Latent statistics in the published format."""
    return {"latents_scale": torch.full((1, 4, 1, 1), value), "latents_bias": torch.full((1, 4, 1, 1), -value)}


def assert_same_weights(a, b):
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


def test_load_vae_from_hub_id_offline(hub_cache):
    vae = tiny_vae(0)
    add_repo(hub_cache, "REPA-E/test-vae", {"tiny-vae.pt": vae.state_dict(), "tiny-vae-latents-stats.pt": stats(2.0),
                                            "README.md": "card"})
    for spec in ("REPA-E/test-vae", "hf://REPA-E/test-vae", "hf://REPA-E/test-vae/tiny-vae.pt",
                 f"hf://REPA-E/test-vae@{COMMIT}/tiny-vae.pt"):
        loaded, loaded_stats = load_vae(TINY_VAE, spec)
        assert_same_weights(loaded, vae)
        assert torch.equal(loaded_stats["latents_bias"], stats(2.0)["latents_bias"]), spec
    path = resolve_weights("REPA-E/test-vae", kind="vae")
    assert path == hub_cache / "models--REPA-E--test-vae" / "snapshots" / COMMIT / "tiny-vae.pt"


def test_missing_files_say_what_where_and_how_to_fetch(hub_cache):
    add_repo(hub_cache, "REPA-E/test-vae", {"tiny-vae.pt": {}})
    with pytest.raises(FileNotFoundError) as error:
        resolve_weights("hf://REPA-E/test-vae/other.pt", kind="vae")
    message = str(error.value)
    assert "file other.pt of hub repo REPA-E/test-vae" in message and "HF_HUB_OFFLINE" in message
    assert str(hub_cache / "models--REPA-E--test-vae") in message
    assert f"hf download REPA-E/test-vae --include 'other*' --cache-dir {hub_cache}" in message

    with pytest.raises(UserError) as error:  # a published repo: its file name comes from the table
        load_vae("f16d32", "REPA-E/e2e-vavae")
    message = str(error.value)
    assert message.startswith("--vae-ckpt REPA-E/e2e-vavae: REPA-E/e2e-vavae is no local file or folder, so it was "
                              "read as a hub id")
    assert "hf download REPA-E/e2e-vavae --include 'e2e-vavae-400k*' --cache-dir" in message
    with pytest.raises(FileNotFoundError, match=f"hf download REPA-E/sit-repae-vavae {SIT_FILE} --cache-dir"):
        resolve_weights("REPA-E/sit-repae-vavae")

    with pytest.raises(FileNotFoundError, match=f"hf download REPA-E/absent --cache-dir {hub_cache}"):
        resolve_weights("REPA-E/absent")  # not in the table: nothing says which file, fetch the repo


def test_existing_local_path_wins_and_other_paths_pass_through(hub_cache, tmp_path, monkeypatch):
    add_repo(hub_cache, "REPA-E/test-vae", {"tiny-vae.pt": tiny_vae(0).state_dict()})
    local = tiny_vae(1)
    (tmp_path / "REPA-E").mkdir()
    torch.save(local.state_dict(), tmp_path / "REPA-E" / "test-vae")
    monkeypatch.chdir(tmp_path)
    assert str(resolve_weights("REPA-E/test-vae")) == "REPA-E/test-vae"
    assert_same_weights(load_vae(TINY_VAE, "REPA-E/test-vae", require_stats=False)[0], local)
    # a missing OWNER/NAME.pt or deeper path is a local path: the loader names it as before
    assert str(resolve_weights("pretrained/e2e-vavae.pt")) == "pretrained/e2e-vavae.pt"
    with pytest.raises(UserError, match="--vae-ckpt pretrained/sdvae/sdvae-f8d4.pt: no such file or folder"):
        load_vae("f8d4", "pretrained/sdvae/sdvae-f8d4.pt")


def test_diffusers_repo_resolves_to_its_folder(hub_cache):
    vae = tiny_vae(0)
    add_repo(hub_cache, "REPA-E/test-vae-hf", {"config.json": lambda folder: export_diffusers_vae(
        vae, TINY_VAE, folder, latents_stats=stats(3.0))})
    path = resolve_weights("REPA-E/test-vae-hf", kind="vae")
    assert path == hub_cache / "models--REPA-E--test-vae-hf" / "snapshots" / COMMIT
    assert all((path / name).is_file() for name in (*DIFFUSERS_FILES, DIFFUSERS_STATS))  # what the hub fetches
    loaded, loaded_stats = load_vae(TINY_VAE, "REPA-E/test-vae-hf")
    assert_same_weights(loaded, vae)
    assert torch.allclose(loaded_stats["latents_scale"], stats(3.0)["latents_scale"])
    with pytest.raises(FileNotFoundError, match=f"hf download REPA-E/e2e-vavae-hf --cache-dir {hub_cache}"):
        resolve_weights("REPA-E/e2e-vavae-hf")  # a diffusers repo is fetched whole


def test_default_file_table_discovery_and_discriminator(hub_cache):
    # the table names the file even when the repo holds several weights files
    add_repo(hub_cache, "REPA-E/e2e-vavae", {"e2e-vavae-400k.pt": {}, "e2e-vavae-200k.pt": {}})
    assert resolve_weights("REPA-E/e2e-vavae").name == "e2e-vavae-400k.pt"
    add_repo(hub_cache, "REPA-E/test-two", {"a.pt": {}, "b.safetensors": {}})
    with pytest.raises(ValueError, match=r"holds 2 weights files \(a.pt, b.safetensors\): name one as "
                                         r"hf://REPA-E/test-two/FILE"):
        resolve_weights("REPA-E/test-two")
    # --disc-pretrained-ckpt REPA-E/NAME means the discriminator beside the repo's VAE
    add_repo(hub_cache, "REPA-E/test-sdvae", {"sdvae.pt": {}, "sdvae-discriminator-ckpt.pt": {"w": torch.ones(1)}})
    assert resolve_weights("REPA-E/test-sdvae", kind="discriminator").name == "sdvae-discriminator-ckpt.pt"
    assert resolve_weights("REPA-E/test-sdvae").name == "sdvae.pt"


def test_entry_points_take_hub_ids(hub_cache, tmp_path):
    vae = tiny_vae(0)
    sit = tiny_sit()
    checkpoint = training_checkpoint(sit, vae, steps=4, args=argparse.Namespace(vae=TINY_VAE))
    add_repo(hub_cache, "REPA-E/sit-test", {"checkpoints/0000004.pt": checkpoint})

    outputs = save_vae_weights.main(["--repae-ckpt", "REPA-E/sit-test", "--vae-name", "e2e", "--save-dir",
                                     str(tmp_path / "out")])
    assert_same_weights(load_vae(TINY_VAE, outputs["vae"])[0], vae)

    # generate names the run after the repo (not the cache's commit folder) and the step after the file
    args = generate.parse_args(["--ckpt", "REPA-E/sit-test"])
    ckpt, exp_name, step = generate.resolve_checkpoint(args, rank=0)
    assert (ckpt.name, exp_name, step) == ("0000004.pt", "sit-test", "0000004")
    args = generate.parse_args(["--ckpt", "hf://REPA-E/sit-test/checkpoints/0000004.pt"])
    assert generate.resolve_checkpoint(args, rank=0)[1:] == ("sit-test", "0000004")
