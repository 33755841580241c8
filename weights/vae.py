"""Every VAE the project loads, through one front door.

A VAE is named by two flags: its kind (`--vae`: one of our layouts f8d4, f16d32, ..., or `diffusers` for any
diffusers AutoencoderKL) and its weights (`--vae-ckpt`: NAME.pt / .safetensors with NAME-latents-stats.pt beside it,
a diffusers AutoencoderKL folder, a hub id, or `none`). `resolve_vae` turns the two into one `VaeSource` (the kind,
the form of the weights and their local path; a hub id is fetched there), reporting a mistake with the flags as the
user typed them; `VaeSource.load` then builds the network with the one loader of that form.

The two kinds carry what differs between them, so that callers never ask which kind they hold:
- `LayoutKind`: our AutoencoderKL of a registered layout (the published checkpoints' networks); a diffusers folder
  of that layout is converted to it; a training checkpoint keeps its weights only (`--vae` names the layout).
- `DiffusersKind`: diffusers' own network of any block layout (`DiffusersAutoencoder`); it always comes from a folder
  (its config.json decides the network) and a training checkpoint keeps that config beside the weights.
"""
import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from models.autoencoder import DIFFUSERS_VAE, DiffusersAutoencoder, check_image_size, vae_arch_of, vae_models, vae_names
from utils.errors import PATH_ERRORS, UserError
from weights.checkpoint import atomic_save, load_file, load_state_dict_strict, uninitialized
from weights.diffusers_format import (
    empty_diffusers_autoencoder,
    export_diffusers_autoencoder,
    export_diffusers_vae,
    is_diffusers_vae_folder,
    load_diffusers_autoencoder,
    load_diffusers_vae_folder,
    read_diffusers_config,
)
from weights.hub import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_STATS,
    DIFFUSERS_WEIGHTS,
    HUB_PREFIX,
    parse_hub_spec,
    resolve_weights,
)
from weights.latent_stats import check_latents_stats, latents_stats_path

NO_CHECKPOINT = ("", "none", "None")
VAE_CONFIG_KEY = "vae_config"  # training-checkpoint entry: the diffusers config of a --vae diffusers run
# The forms VAE weights come in.
RANDOM, STATE_DICT_FILE, DIFFUSERS_FOLDER = "random", "state-dict file", "diffusers folder"
RUN_VAE = "the run's --vae"  # how messages name the VAE kind when it comes from a training run's args


class LayoutKind:
    """Our AutoencoderKL of one registered layout (models.autoencoder.vae_models)."""

    def __init__(self, arch):
        self.name = arch

    def random(self):
        """A randomly initialised network (smoke runs)."""
        return vae_models[self.name]()

    def downsample_factor(self, path):
        """The layout's downsampling factor; nothing is allocated or read."""
        with torch.device("meta"):
            return vae_models[self.name]().downsample_factor

    def from_state_dict_file(self, path, arch_flag):
        """(network, statistics of NAME-latents-stats.pt beside it or None) from a NAME.pt / .safetensors file."""
        vae = load_state_dict_strict(uninitialized(vae_models[self.name], "cpu"), load_file(path), str(path),
                                     flags=f"{arch_flag or RUN_VAE} {self.name}")
        stats_path = latents_stats_path(path)
        return vae, check_latents_stats(load_file(stats_path), stats_path) if stats_path.is_file() else None

    def from_folder(self, folder, arch_flag):
        """(network, statistics or None) from a diffusers folder of this layout, converted to our keys; arch_flag
        (None: the layout comes from a training run's args) names the way out of another layout."""
        try:
            vae, folder_arch, stats = load_diffusers_vae_folder(folder)
        except UserError as error:  # a layout of diffusers' own: only --vae diffusers takes it
            folder_arch, reason = None, str(error)
        else:
            reason = f"{folder} holds a {folder_arch or 'differently laid out'} VAE"
            if folder_arch == self.name:
                return vae, stats
        if arch_flag is None:
            raise UserError(f"{reason}, but the run trained with --vae {self.name}: pass a VAE of that layout")
        raise UserError(f"{reason}, but {arch_flag} is {self.name}: pass {arch_flag} {folder_arch or DIFFUSERS_VAE}"
                        f"{'' if folder_arch else ', which takes any AutoencoderKL folder'}")

    def checkpoint_entries(self, vae):
        """Nothing beside the weights: --vae names the layout."""
        return {}

    def from_checkpoint(self, checkpoint, source, device="cpu"):
        """The network of a training checkpoint's `vae` weights, in eval mode."""
        vae = uninitialized(vae_models[self.name], device)
        return load_state_dict_strict(vae, checkpoint["vae"], f"{source} [vae]").eval()

    def export(self, checkpoint, stats, outputs, source):
        """Write NAME.pt and, if asked, a diffusers folder of our layout."""
        if "vae" in outputs:
            atomic_save(checkpoint["vae"], outputs["vae"])
        if "diffusers" in outputs:
            vae = self.from_checkpoint(checkpoint, source)
            _write_folder(outputs["diffusers"], lambda tmp: export_diffusers_vae(vae, self.name, tmp, stats))

    def export_outputs(self, out_dir, name, diffusers):
        """The files `export` writes: NAME.pt, and the diffusers folder when asked."""
        return {"vae": out_dir / f"{name}.pt", **({"diffusers": out_dir / "diffusers"} if diffusers else {})}


class DiffusersKind:
    """diffusers' AutoencoderKL of any block layout, behind our autoencoder contract (DiffusersAutoencoder)."""

    name = DIFFUSERS_VAE

    def random(self):
        """Refused: the network is defined by a folder's config."""
        raise UserError(f"a random --vae {DIFFUSERS_VAE} VAE has no network: its folder's config.json defines it; "
                        f"pass the folder, or one of the layouts {', '.join(vae_models)}")

    def downsample_factor(self, path):
        """Every down block of the folder's config but the last halves the resolution; no weights are read."""
        return DiffusersAutoencoder.downsample_factor_of(read_diffusers_config(path))

    def from_state_dict_file(self, path, arch_flag):
        """Refused: weights without their config define no network."""
        raise UserError(f"{path} is a weights file, but --vae {DIFFUSERS_VAE} needs a diffusers AutoencoderKL folder "
                        f"({DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS[0]}): pass the folder")

    def from_folder(self, folder, arch_flag):
        """(DiffusersAutoencoder, statistics or None) from the folder."""
        return load_diffusers_autoencoder(folder)

    def checkpoint_entries(self, vae):
        """The diffusers config beside the weights, so the VAE is rebuilt without its folder."""
        return {VAE_CONFIG_KEY: vae.config}

    def from_checkpoint(self, checkpoint, source, device="cpu"):
        """The network of a training checkpoint's `vae` weights and `vae_config`, in eval mode."""
        if VAE_CONFIG_KEY not in checkpoint:
            raise UserError(f"{source} has no '{VAE_CONFIG_KEY}' entry for its --vae {DIFFUSERS_VAE} weights: it was "
                            "not written by train_repae.py --vae diffusers; pass the VAE folder with --vae-ckpt")
        vae = empty_diffusers_autoencoder(checkpoint[VAE_CONFIG_KEY], device)
        return load_state_dict_strict(vae, checkpoint["vae"], f"{source} [vae]").eval()

    def export(self, checkpoint, stats, outputs, source):
        """Write the diffusers folder of the run's own config (the weights mean nothing without it)."""
        _write_folder(outputs["diffusers"], lambda tmp: export_diffusers_autoencoder(
            checkpoint["vae"], checkpoint[VAE_CONFIG_KEY], tmp, stats, f"{source} [vae]"))

    def export_outputs(self, out_dir, name, diffusers):
        """The diffusers folder, always (no NAME.pt: the weights need their config)."""
        return {"diffusers": out_dir / "diffusers"}


def _write_folder(folder, write):
    """write(tmp) into a temporary folder that replaces `folder` when complete: no half-written folder is left."""
    from utils.files import atomic_write

    with atomic_write(folder, folder=True) as tmp:
        write(tmp)


def vae_kind(arch, flag="--vae"):
    """The kind of VAE a --vae value names; UserError naming the flag if it names none."""
    if arch == DIFFUSERS_VAE:
        return DiffusersKind()
    if arch in vae_models:
        return LayoutKind(arch)
    raise UserError(f"{flag} {arch} is unknown; known: {', '.join(vae_names)}")


def checkpoint_vae_kind(checkpoint, source):
    """The kind of the VAE a training checkpoint holds: its `vae_config`, else the layout its weights fit."""
    if isinstance(checkpoint.get(VAE_CONFIG_KEY), dict):
        return DiffusersKind()
    arch = vae_arch_of(checkpoint["vae"])
    if arch is None:
        raise UserError(f"{source} [vae] fits none of the autoencoder layouts {', '.join(vae_models)}")
    return LayoutKind(arch)


@dataclass(frozen=True)
class VaeSource:
    """A VAE as resolved from its flags: kind, form of the weights, their local path (None for RANDOM), and the flags
    as given (for messages)."""

    kind: object
    form: str
    path: Path | None
    given: str
    arch_flag: str | None = "--vae"

    def downsample_factor(self):
        """The network's downsampling factor, from its layout or config; no weights are read."""
        return self.kind.downsample_factor(self.path)

    def load(self, require_stats=False, seed=None):
        """(VAE, latent statistics or None). A RANDOM VAE is drawn from the global random stream, or with `seed`
        without touching it; require_stats makes missing statistics an error naming where they were looked for."""
        if self.form == RANDOM:
            warnings.warn("no VAE checkpoint given: using a randomly initialised VAE (smoke runs only)")
            with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
                if seed is not None:
                    torch.manual_seed(seed)
                vae = self.kind.random()
            return vae, None
        try:
            if self.form == DIFFUSERS_FOLDER:
                vae, stats = self.kind.from_folder(self.path, self.arch_flag)
            else:
                vae, stats = self.kind.from_state_dict_file(self.path, self.arch_flag)
        except (UserError, *PATH_ERRORS) as error:  # a damaged file or another layout: one line naming the flag
            raise UserError(f"{self.given}: {' '.join(str(error).split())}") from None
        if stats is None and require_stats:
            expected = (f"{self.path / DIFFUSERS_STATS} or latent statistics in its {DIFFUSERS_CONFIG}"
                        if self.form == DIFFUSERS_FOLDER else latents_stats_path(self.path))
            raise UserError(f"{self.given}: no latent statistics for {self.path}: expected {expected} with "
                            "{'latents_scale', 'latents_bias'} (save_vae_weights.py writes them)")
        return vae, stats


def resolve_vae(arch, ckpt, *, arch_flag="--vae", ckpt_flag="--vae-ckpt"):
    """The VaeSource of --vae ARCH --vae-ckpt CKPT (or the script's own flag names; arch_flag None: ARCH comes from a
    training run's args); a hub id is fetched here."""
    arch_named = arch_flag or RUN_VAE
    kind = vae_kind(arch, arch_named)
    given = f"{ckpt_flag} {ckpt}"
    if ckpt is None or ckpt in NO_CHECKPOINT:
        if isinstance(kind, DiffusersKind):
            raise UserError(f"{arch_named} {DIFFUSERS_VAE} needs a VAE checkpoint: pass {ckpt_flag} FOLDER_OR_HUB_ID, "
                            "a diffusers AutoencoderKL folder (its config.json decides the network)")
        return VaeSource(kind, RANDOM, None, given, arch_flag)
    path = _local_weights(ckpt, given)
    if path.is_dir():
        if not is_diffusers_vae_folder(path):
            raise UserError(f"{given}: {path} is a folder but no diffusers AutoencoderKL folder ({DIFFUSERS_CONFIG} "
                            f"with _class_name AutoencoderKL, and {' or '.join(DIFFUSERS_WEIGHTS)}): pass such a "
                            "folder (e.g. the vae/ of a FLUX, SD3.5 or SD-XL download) or a NAME.pt file")
        return VaeSource(kind, DIFFUSERS_FOLDER, path, given, arch_flag)
    if not path.is_file():
        raise UserError(f"{given}: no such file or folder; pass NAME.pt (NAME-latents-stats.pt beside it), "
                        "a .safetensors file, a diffusers AutoencoderKL folder, a hub id, or none for a random VAE")
    if isinstance(kind, DiffusersKind):
        raise UserError(f"{given} is a weights file, but {arch_named} {DIFFUSERS_VAE} needs a diffusers "
                        f"AutoencoderKL folder ({DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS[0]}): pass the folder")
    return VaeSource(kind, STATE_DICT_FILE, path, given, arch_flag)


def _local_weights(ckpt, given):
    """The local path of a VAE checkpoint: the path itself, or what its hub id resolves to through the cache
    (hf://OWNER/NAME[@REV]/SUBFOLDER fetches the subfolder's config and weights, e.g. the vae/ of a pipeline repo)."""
    hub = None if Path(ckpt).exists() else parse_hub_spec(ckpt)
    try:
        if hub is not None and hub[1] is not None and not Path(hub[1]).suffix:  # a folder of the repo
            repo, subfolder, revision = hub
            base = f"{HUB_PREFIX}{repo}{f'@{revision}' if revision else ''}/{subfolder.strip('/')}"
            resolve_weights(f"{base}/{DIFFUSERS_WEIGHTS[0]}")
            return resolve_weights(f"{base}/{DIFFUSERS_CONFIG}").parent
        return Path(resolve_weights(ckpt, kind="vae"))
    except (UserError, *PATH_ERRORS) as error:
        raise UserError(f"{given}: {' '.join(str(error).split())}") from None


def load_vae(arch, ckpt, require_stats=True, *, arch_flag="--vae", ckpt_flag="--vae-ckpt", seed=None):
    """(VAE, latent statistics or None) of --vae ARCH --vae-ckpt CKPT: resolve_vae, then VaeSource.load."""
    source = resolve_vae(arch, ckpt, arch_flag=arch_flag, ckpt_flag=ckpt_flag)
    return source.load(require_stats=require_stats, seed=seed)


def vae_checkpoint_entries(arch, vae):
    """What a training checkpoint keeps beside the `vae` weights of a --vae ARCH run."""
    return vae_kind(arch).checkpoint_entries(vae)


def vae_from_checkpoint(arch, checkpoint, source, device="cpu"):
    """The VAE of a training checkpoint of a --vae ARCH run, in eval mode."""
    return vae_kind(arch).from_checkpoint(checkpoint, source, device)


def load_vaes(arch, ckpts, image_size, seed=0):
    """{ckpt: VAE in eval mode} of every --vae-ckpt, loaded up front so that a bad one fails before any work; 'none'
    gives a random VAE seeded with `seed`. The images must fit each VAE's downsampling."""
    vaes = {}
    for ckpt in ckpts:
        vae, _ = load_vae(arch, ckpt, require_stats=False, seed=seed)
        check_image_size(image_size, vae.downsample_factor, f"--vae {arch}")
        vaes[ckpt] = vae.eval()
    return vaes
