"""Encoders: published preprocessing, token shapes of every family, weight files in all formats, missing weights."""
import warnings

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from helpers import randomize_vit_
from models.encoders import build_encoder, encoder_patch_tokens, preprocess_raw_image
from utils.errors import UserError
from weights.encoders import load_encoders, read_weights

EMBED_DIMS = {
    "dinov2-vit-s": 384, "dinov2-vit-b": 768, "dinov2-vit-l": 1024, "dinov2-vit-g": 1536,
    "dinov2reg-vit-s": 384, "dinov2reg-vit-b": 768, "dinov2reg-vit-l": 1024, "dinov2reg-vit-g": 1536,
    "mocov3-vit-s": 384, "mocov3-vit-b": 768, "mocov3-vit-l": 1024,
    "dinov1-vit-b": 768, "clip-vit-L": 1024, "mae-vit-l": 1024, "jepa-vit-h": 1280,
}


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """Empty working dir, torch.hub cache and HF cache; no weight variables."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in EMBED_DIMS:
        monkeypatch.delenv("REPAE_ENCODER_CKPT_" + name.upper().replace("-", "_"), raising=False)
    monkeypatch.delenv("REPAE_ENCODER_CKPT", raising=False)
    return tmp_path


def half_state_dict(model):
    """model's state dict in float16, its weights first rounded to float16 in place so that they load back exactly:
    a safetensors file of half the size (44 MB for a ViT-S)."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half())
    return {key: value.half() for key, value in model.state_dict().items()}


def hf_cache_snapshot(hf_cache, repo):
    """The snapshot folder of repo's main revision in the Hugging Face cache layout, as a download leaves it."""
    storage = hf_cache / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text("0" * 40)
    (storage / "snapshots" / ("0" * 40)).mkdir(parents=True)
    return storage / "snapshots" / ("0" * 40)


def to_official_dinov2(timm_state):
    """timm DINOv2 state dict -> the official hub checkpoint layout (mask token; class position inside pos_embed)."""
    state = dict(timm_state)
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    if "reg_token" in state:
        class_pos = torch.randn(1, 1, state["cls_token"].shape[-1])
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - class_pos
        state["pos_embed"] = torch.cat([class_pos, state["pos_embed"]], dim=1)
    return state


def test_preprocess_matches_published(preprocess_fix):
    expected = preprocess_fix["encoder_inputs"]
    assert sorted(expected) == ["clip-vit-L", "dinov1-vit-b", "dinov2-vit-b", "jepa-vit-h", "mae-vit-l", "mocov3-vit-b"]
    for name, inputs in expected.items():
        out = preprocess_raw_image(preprocess_fix["raw_uint8"], name.split("-")[0])
        torch.testing.assert_close(out, inputs, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_preprocess_sizes_at_512():
    x = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
    assert preprocess_raw_image(x, "dinov2").shape[-1] == 448
    assert preprocess_raw_image(x, "clip").shape[-1] == 448
    assert preprocess_raw_image(x, "mocov3").shape[-1] == 512
    assert preprocess_raw_image(x[..., :256, :256], "jepa", resolution=256).shape[-1] == 224


# The fast tier builds the ViT-S families at 256 px; the slow tier every family and size at 256 and 512 px.
FAST_SHAPES = {("dinov2-vit-s", 256), ("dinov2reg-vit-s", 256), ("mocov3-vit-s", 256)}


@pytest.mark.parametrize("name,resolution", [
    pytest.param(name, resolution, marks=() if (name, resolution) in FAST_SHAPES else pytest.mark.slow)
    for name in sorted(EMBED_DIMS) for resolution in (256, 512)])
def test_every_family_shapes_on_meta(name, resolution):
    with pytest.warns(UserWarning, match="random weights"):
        encoders, types, archs = load_encoders(name, "meta", resolution=resolution, random_init=True)
    encoder, = encoders
    assert (types, archs) == ([name.split("-")[0]], ["vit"])
    assert encoder.embed_dim == EMBED_DIMS[name] and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    x = preprocess_raw_image(torch.zeros(2, 3, resolution, resolution, dtype=torch.uint8, device="meta"), types[0])
    tokens = encoder_patch_tokens(encoder, types[0], x)
    assert tokens.shape == (2, (16 * resolution // 256) ** 2, EMBED_DIMS[name])


@pytest.mark.parametrize("name,resolution", [
    ("dinov2-vit-s", 256), *(pytest.param(name, resolution, marks=pytest.mark.slow) for name, resolution in (
        ("dinov2reg-vit-s", 256), ("mocov3-vit-s", 256), ("dinov2-vit-s", 512)))])
def test_small_encoders_run(name, resolution):
    with pytest.warns(UserWarning):
        (encoder,), (enc_type,), _ = load_encoders(name, "cpu", resolution=resolution, random_init=True)
    x = preprocess_raw_image(torch.randint(0, 256, (1, 3, resolution, resolution), dtype=torch.uint8), enc_type)
    with torch.no_grad():
        tokens = encoder_patch_tokens(encoder, enc_type, x)
    assert tokens.shape == (1, (16 * resolution // 256) ** 2, 384) and torch.isfinite(tokens).all()


def test_several_encoders_in_one_call():
    with pytest.warns(UserWarning, match=r"^encoder \S+: random weights \(--enc-random-init\); its features"):
        encoders, types, archs = load_encoders("dinov2-vit-b,mocov3-vit-l", "meta", random_init=True)
    assert [e.embed_dim for e in encoders] == [768, 1024]
    assert (types, archs) == (["dinov2", "mocov3"], ["vit", "vit"])


def test_patch_tokens_drop_prefix_and_skip_norm_for_mae_clip():
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=2, num_classes=0).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        normed = encoder_patch_tokens(vit, "dinov2", x)
        raw = encoder_patch_tokens(vit, "mae", x)
        torch.testing.assert_close(normed, vit.forward_features(x)[:, 5:], rtol=0, atol=0)
        torch.testing.assert_close(vit.norm(raw), normed)  # MAE / CLIP tokens: same blocks, no final norm
    assert raw.shape == (2, 4, 384)


@pytest.mark.slow
def test_hub_format_dinov2_reg_file_gives_source_features(tmp_path, monkeypatch):
    source = randomize_vit_(build_encoder("dinov2reg", "s", 256)).eval()
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(to_official_dinov2(source.state_dict()), path)
    monkeypatch.setenv("REPAE_ENCODER_CKPT_DINOV2REG_VIT_S", str(path))
    (encoder,), _, _ = load_encoders("dinov2reg-vit-s", "cpu")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder_patch_tokens(encoder, "dinov2reg", x),
                                   encoder_patch_tokens(source, "dinov2reg", x), rtol=1e-5, atol=1e-5)


def test_hub_cache_dinov2_518_checkpoint_resampled_as_published(no_weights_anywhere):
    source = randomize_vit_(timm.create_model("vit_small_patch14_dinov2", img_size=518, num_classes=0))
    official = to_official_dinov2(source.state_dict())
    hub_dir = no_weights_anywhere / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    torch.save(official, hub_dir / "dinov2_vits14_pretrain.pth")
    (encoder,), _, _ = load_encoders("dinov2-vit-s", "cpu", resolution=512)
    # the published code resamples the hub model's 37x37 grid to 32x32 for 448 px inputs
    torch.testing.assert_close(encoder.pos_embed, resample_abs_pos_embed(official["pos_embed"], [32, 32]),
                               rtol=0, atol=0)
    torch.testing.assert_close(encoder.blocks[3].ls2.gamma, official["blocks.3.ls2.gamma"], rtol=0, atol=0)


def test_timm_weights_from_the_hf_cache(no_weights_anywhere):
    source = randomize_vit_(timm.create_model("vit_small_patch14_dinov2", img_size=518, num_classes=0))
    snapshot = hf_cache_snapshot(no_weights_anywhere / "hf", "timm/vit_small_patch14_dinov2.lvd142m")
    save_file(half_state_dict(source), snapshot / "model.safetensors")  # positions resampled in float32 all the same
    (encoder,), _, _ = load_encoders("dinov2-vit-s", "cpu")
    torch.testing.assert_close(encoder.pos_embed, resample_abs_pos_embed(source.pos_embed, [16, 16]), rtol=0, atol=0)


@pytest.mark.slow
def test_mocov3_release_format_and_timm_format(tmp_path):
    source = randomize_vit_(build_encoder("mocov3", "s", 256)).eval()
    pos_224 = torch.randn(1, 1 + 14 * 14, 384)  # MoCo v3 was trained at 224 px
    state = {"module.base_encoder." + k: v for k, v in source.state_dict().items() if k != "pos_embed"}
    state.update({"module.base_encoder.pos_embed": pos_224, "module.base_encoder.head.0.weight": torch.zeros(4, 384),
                  "module.momentum_encoder.cls_token": torch.zeros(1, 1, 384)})
    torch.save({"state_dict": state, "epoch": 300}, tmp_path / "vit-s-300ep.pth.tar")
    (encoder,), _, _ = load_encoders("mocov3-vit-s", "cpu", ckpt=str(tmp_path / "vit-s-300ep.pth.tar"))
    torch.testing.assert_close(encoder.pos_embed, resample_abs_pos_embed(pos_224, [16, 16]), rtol=0, atol=0)
    torch.testing.assert_close(encoder.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight, rtol=0, atol=0)

    torch.save(source.state_dict(), tmp_path / "timm.pth")
    (encoder,), _, _ = load_encoders("mocov3-vit-s", "cpu", ckpt=str(tmp_path / "timm.pth"))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(encoder_patch_tokens(encoder, "mocov3", x),
                                   encoder_patch_tokens(source, "mocov3", x), rtol=0, atol=0)


@pytest.mark.slow
def test_torchscript_weights_load_only_when_allowed(tmp_path):
    source = randomize_vit_(build_encoder("mocov3", "s", 16)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about the shape checks it freezes
        scripted = torch.jit.trace(source, torch.randn(1, 3, 16, 16))
    path = tmp_path / "ViT-s.pt"
    torch.jit.save(scripted, path)
    message = (f"encoder weights {path} are a TorchScript archive: loading it runs code stored in the file. If you "
               "trust the file, pass --enc-allow-torchscript; or convert it once to a state dict")
    with pytest.raises(UserError) as error:
        read_weights(path)
    assert str(error.value).startswith(message)
    with pytest.raises(UserError) as error:
        load_encoders("mocov3-vit-s", "cpu", resolution=16, ckpt=str(path))
    assert str(error.value).startswith(message)
    (encoder,), _, _ = load_encoders("mocov3-vit-s", "cpu", resolution=16, ckpt=str(path), allow_torchscript=True)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_weights_that_are_no_state_dict_are_named(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match=f"^encoder weights {path} hold a Tensor, not a state dict$"):
        load_encoders("mocov3-vit-s", "meta", resolution=16, ckpt=str(path))
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match=f"^encoder weights {path} does not fit VisionTransformer: check --enc-type "
                                        "against the checkpoint"):
        load_encoders("mocov3-vit-s", "cpu", resolution=16, ckpt=str(path))


def test_missing_weights_error_says_what_to_get(no_weights_anywhere):
    with pytest.raises(FileNotFoundError) as error:
        load_encoders("dinov2-vit-b", "cpu")
    message = str(error.value)
    for part in ("dinov2_vitb14_pretrain.pth", "torch/hub/checkpoints", "REPAE_ENCODER_CKPT_DINOV2_VIT_B",
                 "timm/vit_base_patch14_dinov2.lvd142m", "--enc-ckpt", "is fetched when HF_HUB_OFFLINE is unset"):
        assert part in message
    assert message.endswith("For a smoke run without weights pass --enc-random-init.")
    with pytest.raises(FileNotFoundError, match=r"ckpts/mocov3_vitb\.pth.*moco-v3|moco-v3.*ckpts/mocov3_vitb\.pth"):
        load_encoders("mocov3-vit-b", "cpu")
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        load_encoders("dinov2-vit-b", "cpu", ckpt="nope.pth")


@pytest.fixture
def online_hub(no_weights_anywhere, monkeypatch):
    """HF_HUB_OFFLINE unset; the hub's requests are recorded and answered by `answers` (nothing reaches the network).

    answers maps a file name to what its metadata request does: an exception to raise, else a path that the
    download returns.
    """
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls, answers = [], {}

    def metadata(url, **kwargs):
        calls.append(("metadata", url.rsplit("/", 1)[-1]))
        answer = answers.get(url.rsplit("/", 1)[-1], ConnectionError("hub unreachable"))
        if isinstance(answer, Exception):
            raise answer

    def download(repo, filename, **kwargs):
        calls.append(("download", filename))
        answer = answers.get(filename, ConnectionError("hub unreachable"))
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls, answers


def test_unreachable_hub_is_asked_once_without_retries(online_hub):
    calls, _ = online_hub
    with pytest.raises(FileNotFoundError) as error:
        load_encoders("dinov2-vit-s", "cpu")
    # hf_hub_download retries an unreachable hub for about a minute per file: one bounded request instead
    assert calls == [("metadata", "model.safetensors")]
    assert ("The timm copy on the Hugging Face hub (timm/vit_small_patch14_dinov2.lvd142m) is not in the cache and "
            "could not be fetched.") in str(error.value)


@pytest.mark.slow
def test_hub_cache_is_read_first_when_online(online_hub, no_weights_anywhere):
    calls, _ = online_hub
    source = randomize_vit_(timm.create_model("vit_small_patch14_dinov2", img_size=518, num_classes=0))
    snapshot = hf_cache_snapshot(no_weights_anywhere / "hf", "timm/vit_small_patch14_dinov2.lvd142m")
    torch.save(source.state_dict(), snapshot / "pytorch_model.bin")  # the second name: every name is looked up first
    (encoder,), _, _ = load_encoders("dinov2-vit-s", "cpu")
    assert calls == []
    torch.testing.assert_close(encoder.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight, rtol=0, atol=0)


@pytest.mark.slow
def test_reachable_hub_fetches_the_name_the_repo_holds(online_hub, tmp_path):
    calls, answers = online_hub
    source = randomize_vit_(timm.create_model("vit_small_patch14_dinov2", img_size=518, num_classes=0))
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    answers.update({"model.safetensors": EntryNotFoundError("no model.safetensors"),
                    "pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    (encoder,), _, _ = load_encoders("dinov2-vit-s", "cpu")
    assert calls == [("metadata", "model.safetensors"), ("metadata", "pytorch_model.bin"),
                     ("download", "pytorch_model.bin")]
    torch.testing.assert_close(encoder.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight, rtol=0, atol=0)


@pytest.mark.parametrize("enc_type", ["dinov2-vit-x", "foo-vit-b", "dinov2-vitb", "clip-vit-l", "mocov3-resnet-b"])
def test_unsupported_names_rejected(enc_type):
    with pytest.raises(ValueError, match="encoder"):
        load_encoders(enc_type, "meta", random_init=True)


def test_checkpoint_count_must_match_encoders():
    with pytest.raises(ValueError, match="2 encoder checkpoint paths"):
        load_encoders("dinov2-vit-b", "meta", ckpt="a.pth,b.pth")
