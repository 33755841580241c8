"""Checkpoints named by their Hugging Face hub id, resolved through the hub's cache (offline aware)."""
import os
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

from utils.errors import UserError

# A hub id where a checkpoint path is taken: hf://OWNER/NAME[@REVISION][/PATH/IN/REPO], or a bare OWNER/NAME that is
# no local path. Without a file the repo's default below is meant.
HUB_PREFIX = "hf://"
HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+))?(?:/(?P<file>.+))?")
BARE_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")
STATS_SUFFIX, DISCRIMINATOR_SUFFIX = "-latents-stats.pt", "-discriminator-ckpt.pt"
# A diffusers AutoencoderKL folder: its config, its weights (written: the first; read: either) and the latent
# statistics that weights.diffusers_format writes beside them when it has some.
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_STATS = "latents_stats.pt"
DIFFUSERS_FILES = (DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS[0])  # what a diffusers repo on the hub must hold
DIFFUSERS = "<diffusers folder>"  # the file a diffusers repo's bare id means: the whole folder

# The REPA-E releases (huggingface.co/REPA-E) and the file their bare id means. None: the file name is not
# recorded here, the repo's only weights file is taken (listed by the hub, or found in the cache when offline).
HUB_DEFAULT_FILES = {
    "REPA-E/sdvae": "sdvae-f8d4.pt",  # REPA-E's starting VAEs; beside each: NAME-discriminator-ckpt.pt
    "REPA-E/invae": None,
    "REPA-E/vavae": None,
    "REPA-E/e2e-sdvae": "e2e-sdvae-400k.pt",  # end-to-end tuned VAEs; beside each: NAME-latents-stats.pt
    "REPA-E/e2e-invae": None,
    "REPA-E/e2e-vavae": "e2e-vavae-400k.pt",
    "REPA-E/e2e-sdvae-hf": DIFFUSERS,
    "REPA-E/e2e-invae-hf": DIFFUSERS,
    "REPA-E/e2e-vavae-hf": DIFFUSERS,
    "REPA-E/sit-repae-sdvae": None,  # REPA-E training checkpoints (SiT + VAE + discriminator)
    "REPA-E/sit-repae-invae": None,
    "REPA-E/sit-repae-vavae": "checkpoints/0400000.pt",
    "REPA-E/sit-ldm-e2e-vavae": "checkpoints/4000000.pt",  # SiT trained on the frozen E2E-VAVAE
}


def parse_hub_spec(spec):
    """(repo id, file or None, revision or None) of a hub id, or None if spec is no hub id."""
    spec = str(spec)
    if spec.startswith(HUB_PREFIX):
        match = HUB_SPEC.fullmatch(spec[len(HUB_PREFIX):])
        if match is None:
            raise UserError(f"{spec} is no hub id: write hf://OWNER/NAME[@REVISION][/FILE]")
        return match["repo"], match["file"], match["revision"]
    # a bare OWNER/NAME.pt is a missing local file, never a repo
    if BARE_REPO.fullmatch(spec) and not spec.endswith(WEIGHT_SUFFIXES):
        return spec, None, None
    return None


def resolve_weights(spec, kind="file"):
    """Local path of a checkpoint given as a path or a hub id, fetched through the Hugging Face cache.

    A path that exists always wins; any other non-hub spec comes back unchanged for the caller to report.
    kind "vae" also fetches NAME-latents-stats.pt beside NAME.pt (load_vae reads it there); kind "discriminator"
    turns a repo's default NAME.pt into NAME-discriminator-ckpt.pt. A diffusers repo resolves to its folder.
    """
    hub = None if Path(spec).exists() else parse_hub_spec(spec)
    if hub is None:
        return Path(spec)
    try:
        return _resolve_hub(*hub, kind)
    except FileNotFoundError as error:
        if str(spec).startswith(HUB_PREFIX):
            raise
        raise FileNotFoundError(f"{spec} is no local file or folder, so it was read as a hub id: {error}") from None


def _resolve_hub(repo_id, filename, revision, kind):
    """resolve_weights for a parsed hub id."""
    if filename is None:
        filename = default_hub_file(repo_id, revision)
        if kind == "discriminator" and filename != DIFFUSERS:
            filename = _sibling(filename, DISCRIMINATOR_SUFFIX)
    # what to fetch, and the `hf download` arguments that fetch it: optional files only by pattern, since the
    # command fails on a file that the repo lacks
    if filename == DIFFUSERS:
        wanted, optional, fetch = list(DIFFUSERS_FILES), [DIFFUSERS_STATS], []
    elif kind == "vae":
        wanted, optional = [filename], [_sibling(filename, STATS_SUFFIX)]
        fetch = ["--include", f"'{Path(filename).with_suffix('').as_posix()}*'"]
    else:
        wanted, optional, fetch = [filename], [], [filename]
    paths = [_hub_download(repo_id, name, revision, fetch) for name in wanted]
    for name in optional:
        _hub_download(repo_id, name, revision, fetch, required=False)
    return paths[0].parent if filename == DIFFUSERS else paths[0]


def default_hub_file(repo_id, revision=None):
    """The file a bare repo id means: HUB_DEFAULT_FILES, else DIFFUSERS or the repo's only weights file."""
    if HUB_DEFAULT_FILES.get(repo_id) is not None:
        return HUB_DEFAULT_FILES[repo_id]
    files = _hub_listing(repo_id, revision)
    if not files:
        reason = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub could not list its files"
        raise FileNotFoundError(_hub_missing(repo_id, revision, [], f"{reason} and the cache holds no copy"))
    if all(name in files for name in DIFFUSERS_FILES):
        return DIFFUSERS
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES) and not f.endswith((STATS_SUFFIX, DISCRIMINATOR_SUFFIX))]
    if len(weights) != 1:
        raise UserError(f"hub repo {repo_id} holds {len(weights)} weights files ({', '.join(weights) or 'none'}): "
                         f"name one as {HUB_PREFIX}{repo_id}/FILE")
    return weights[0]


def _sibling(filename, suffix):
    """NAME.pt -> NAME{suffix} in the same folder of the repo."""
    return Path(filename).with_name(Path(filename).stem + suffix).as_posix()


def hub_offline():
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache():
    """The Hugging Face hub cache folder (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    return Path(constants.HF_HUB_CACHE)


def _hub_snapshot(repo_id, revision):
    """The cached snapshot folder of a repo revision (the documented cache layout), or None."""
    storage = _hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = storage / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = storage / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and snapshot.is_dir() else None


def _hub_listing(repo_id, revision):
    """Files of a repo: listed by the hub when online, else those of its cached snapshot ([] if none)."""
    if not hub_offline():
        try:
            return HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:  # hub unreachable or refusing: the cache decides, and the download reports the error
            pass
    snapshot = _hub_snapshot(repo_id, revision)
    if snapshot is None:
        return []
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _hub_download(repo_id, filename, revision, fetch, required=True):
    """hf_hub_download into the cache (cache only when offline); a missing required file raises FileNotFoundError."""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=_hub_cache(),
                                    local_files_only=hub_offline()))
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled) as error:
        if not required:
            return None
        reason = ("it is not in the cache and HF_HUB_OFFLINE is set" if hub_offline()
                  else f"the hub answered {type(error).__name__}: {str(error).splitlines()[0]}")
        raise FileNotFoundError(_hub_missing(repo_id, revision, fetch, reason, filename)) from error


def _hub_missing(repo_id, revision, fetch, reason, filename=None):
    """What is missing, where it was looked for, and the command (fetch: its file arguments) that gets it."""
    cache = _hub_cache()
    what = f"file {filename} of hub repo {repo_id}" if filename else f"hub repo {repo_id}"
    command = " ".join(["hf download", repo_id, *fetch, *(["--revision", revision] if revision else []),
                        "--cache-dir", str(cache)])
    return (f"{what}{f' at revision {revision}' if revision else ''} is not available: {reason}.\n"
            f"Looked in the Hugging Face cache {cache / ('models--' + repo_id.replace('/', '--'))} "
            f"(set HF_HUB_CACHE or HF_HOME to use another cache).\n"
            f"Fetch it on a machine with network access:\n    {command}\n"
            f"(huggingface_hub < 0.34: huggingface-cli download, same arguments) and copy that models--* folder "
            f"into {cache} here; or download with --local-dir DIR instead and pass the local path.")
