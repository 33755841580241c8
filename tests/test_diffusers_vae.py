"""Export our AutoencoderKL to diffusers folders and import diffusers folders back."""
import copy
import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from fixtures.fill import fill_
from models.autoencoder import AutoencoderKL, vae_arch_of, vae_models
from weights.diffusers_format import (
    _diffusers_key,
    _our_model_for,
    diffusers_config,
    export_diffusers_vae,
    is_diffusers_vae_folder,
    load_diffusers_vae_folder,
)

ARCHS = ["f8d4", "f16d32"]


def tiny_vae():
    """Three-level float32 model, attention at the middle level only."""
    torch.manual_seed(0)
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1, attn_resolutions=(128,))
    return fill_(vae).eval()


def random_stats(channels):
    """Latent statistics in the published format."""
    g = torch.Generator().manual_seed(channels)
    return {"latents_scale": torch.rand(1, channels, 1, 1, generator=g) + 0.5,
            "latents_bias": torch.randn(1, channels, 1, 1, generator=g)}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_diffusers_matches(vae, reference, size):
    """Posterior moments and decoding of our model and the diffusers model agree in float32."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = vae.encode(x)
        theirs = reference.encode(x).latent_dist
        torch.testing.assert_close(theirs.mean, ours.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.std, ours.std, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reference.decode(ours.mean).sample, vae.decode(ours.mean), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(arch, full-size filled float32 model, stats, folder) of the SD-VAE layout exported once per session (the
    f16d32 layout is checked on meta by the key-map test). The weights are rounded to float16 and exported in
    float16, which halves the file (167 MB) and loads back exactly."""
    arch = "f8d4"
    with torch.device("meta"):
        vae = vae_models[arch]()
    vae = fill_(vae.to_empty(device="cpu")).half().float().eval()
    stats = random_stats(vae.latent_channels)
    folder = export_diffusers_vae(copy.deepcopy(vae).half(), arch, tmp_path_factory.mktemp(arch), latents_stats=stats)
    return arch, vae, stats, folder


@pytest.mark.parametrize("arch", ARCHS)
def test_key_map_matches_diffusers_layout(arch):
    with torch.device("meta"):
        vae = vae_models[arch]()
        reference = diffusers.AutoencoderKL(**{k: v for k, v in diffusers_config(vae).items() if not k.startswith("_")})
        rebuilt = _our_model_for(dict(reference.config), "folder")
    assert vae_arch_of(rebuilt.state_dict()) == arch
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = {_diffusers_key(k, len(vae.ch_mult)): tuple(v.shape) for k, v in vae.state_dict().items()}
    assert set(ours) == set(theirs)
    for key, shape in ours.items():
        assert theirs[key] == shape or theirs[key] + (1, 1) == shape, key


@pytest.mark.slow
def test_full_size_export_loads_in_diffusers_and_matches(exported):
    arch, vae, stats, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["_repae_arch"] == arch and config["scaling_factor"] == 1.0
    torch.testing.assert_close(torch.tensor(config["latents_mean"]), stats["latents_bias"].flatten())
    torch.testing.assert_close(torch.tensor(config["latents_std"]), 1 / stats["latents_scale"].flatten())
    reference = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
    assert_diffusers_matches(vae, reference, size=32)


@pytest.mark.slow
def test_full_size_import_round_trips(exported):
    arch, vae, stats, folder = exported
    assert is_diffusers_vae_folder(folder)
    loaded, loaded_arch, loaded_stats = load_diffusers_vae_folder(folder)
    assert loaded_arch == arch and not loaded.training
    assert_same_weights(vae, loaded)
    assert set(loaded_stats) == {"latents_scale", "latents_bias"}
    for key in stats:
        assert torch.equal(loaded_stats[key], stats[key])


def test_stats_from_config_when_file_missing(tmp_path):
    vae = tiny_vae()
    stats = random_stats(vae.latent_channels)
    export_diffusers_vae(vae, None, tmp_path, latents_stats=stats)
    (tmp_path / "latents_stats.pt").unlink()
    loaded, arch, loaded_stats = load_diffusers_vae_folder(tmp_path)
    assert arch is None
    assert_same_weights(vae, loaded)
    for key in stats:
        torch.testing.assert_close(loaded_stats[key], stats[key], rtol=1e-6, atol=1e-6)
        assert loaded_stats[key].shape == (1, 4, 1, 1)


def test_tiny_export_matches_diffusers_without_stats(tmp_path):
    vae = tiny_vae()
    export_diffusers_vae(vae, None, tmp_path, latents_stats=random_stats(vae.latent_channels))
    export_diffusers_vae(vae, None, tmp_path)  # re-export without statistics drops the old ones
    config = json.loads((tmp_path / "config.json").read_text())
    assert "latents_mean" not in config and not (tmp_path / "latents_stats.pt").exists()
    assert config["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
    assert config["up_block_types"] == ["UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    assert_diffusers_matches(vae, diffusers.AutoencoderKL.from_pretrained(tmp_path).eval(), size=16)
    assert load_diffusers_vae_folder(tmp_path)[2] is None


def test_legacy_sd_vae_folder_with_bin_weights(tmp_path):
    """An old SD-VAE style download: minimal config, .bin weights, query/key/value/proj_attn attention names."""
    vae = tiny_vae()
    export_diffusers_vae(vae, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    legacy = {k: config[k] for k in ("_class_name", "act_fn", "block_out_channels", "down_block_types", "in_channels",
                                     "latent_channels", "layers_per_block", "norm_num_groups", "out_channels",
                                     "sample_size", "up_block_types")}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn", "group_norm": "group_norm"}
    weights = {}
    for key, tensor in load_file(tmp_path / "diffusion_pytorch_model.safetensors").items():
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.")
        weights[key] = tensor
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, tmp_path / "diffusion_pytorch_model.bin")
    loaded, arch, stats = load_diffusers_vae_folder(tmp_path)
    assert arch is None and stats is None
    assert_same_weights(vae, loaded)


def test_export_rejects_wrong_arch(tmp_path):
    with pytest.raises(ValueError, match="f8d4"):
        export_diffusers_vae(tiny_vae(), "f8d4", tmp_path)


def test_not_a_diffusers_folder(tmp_path):
    assert not is_diffusers_vae_folder(tmp_path)
    assert not is_diffusers_vae_folder(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert not is_diffusers_vae_folder(tmp_path)
    with pytest.raises(ValueError, match="not a diffusers AutoencoderKL folder"):
        load_diffusers_vae_folder(tmp_path)


def test_unsupported_layout_is_refused(tmp_path):
    export_diffusers_vae(tiny_vae(), None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mid_block_add_attention"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mid_block_add_attention"):
        load_diffusers_vae_folder(tmp_path)
