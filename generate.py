"""Sample images from a trained SiT for FID evaluation: one PNG per image, then an .npz for the ADM suite.

    torchrun --nproc_per_node=8 generate.py --exp-path EXP --train-steps 400000 --cfg-scale 1.0
    python generate.py --ckpt EXP/checkpoints/0400000.pt --num-fid-samples 1000     # one process, GPU or CPU

Samples come from the EMA weights. The folder SAMPLE_DIR/EXPNAME_STEP_cfgSCALE-LOW-HIGH, each process's seed
and the image numbering are those of REPA-E's sampling script, so a run reproduces its random stream. A stopped run
restarts where it stopped: batches whose PNGs all exist are not sampled again, but their random numbers are
still drawn, so every other image comes out as in an uninterrupted run. The settings that made an .npz are kept
beside it (NAME.settings.json): an existing .npz made with the same settings means nothing to do, one made with
other settings is refused, one without that record (older code) is kept as it is.
"""
import argparse
import datetime
import json
import os
from pathlib import Path

from utils.cli import HelpFormatter, positive_int, unit_float
from utils.errors import UserError, report_user_errors
from utils.files import read_json

# Sampled when neither --exp-path nor --ckpt is given.
DEFAULT_EXP_PATH = "pretrained/sit-xl-dinov2-b-enc8-repae-sdvae-0.5-1.5-400k"
DEFAULT_TRAIN_STEPS = "400000"
# Kept in the sample folder: PNGs of an interrupted run are reused only under the same settings.
SETTINGS_FILE = "sampling.json"
# Kept beside SAMPLE_DIR/NAME.npz as NAME.settings.json: what made the .npz (evaluate.py's --json is NAME.json).
NPZ_SETTINGS_SUFFIX = ".settings.json"


def build_parser():
    """The sampling flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--global-seed", type=int, default=0,
                        help="base seed: process r uses (SEED + r) * WORLD_SIZE // 2, as REPA-E")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on GPUs (fast, slightly different numbers)")
    parser.add_argument("--sample-dir", type=str, default="samples",
                        help="PNGs go to SAMPLE_DIR/EXPNAME_STEP_cfgSCALE-LOW-HIGH/, the .npz beside that folder")
    parser.add_argument("--exp-path", type=str, default=None,
                        help=f"experiment folder with args.json and checkpoints/ (none given: {DEFAULT_EXP_PATH})")
    parser.add_argument("--train-steps", type=str, default=None,
                        help="checkpoint step to sample from (none given: the newest in EXP/checkpoints)")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="checkpoint file (or hub id, e.g. REPA-E/sit-repae-sdvae) to sample from; model "
                             "settings come from --exp-path's args.json if given, else from the checkpoint's own args")
    parser.add_argument("--vae-ckpt", type=str, default=None,
                        help="decode with this VAE (NAME.pt, .safetensors, diffusers folder or hub id) instead of the "
                             "checkpoint's (REPA-E) or args.json's vae_ckpt (latent diffusion only); REPA-E "
                             "checkpoints keep the latent statistics of their SiT batch-norm")
    parser.add_argument("--pproc-batch-size", type=positive_int, default=256, help="images per process and batch")
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000, help="images in the .npz")
    parser.add_argument("--mode", type=str, default="ode", choices=["ode", "sde"],
                        help="sampler: Euler ODE or Euler-Maruyama SDE")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--path-type", type=str, default="linear", choices=["linear", "cosine"],
                        help="interpolant the model was trained with")
    parser.add_argument("--num-steps", type=positive_int, default=50, help="sampler steps")
    parser.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                        help="Heun's method (ODE only)")
    parser.add_argument("--guidance-low", type=unit_float, default=0.0, help="guidance only for times above this")
    parser.add_argument("--guidance-high", type=unit_float, default=1.0, help="guidance only for times below this")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the SiT's forward (compiled once per batch shape: 34 s for SiT-T/2 on a "
                             "2-core CPU with an empty compile cache before the first batch; bench/RESULTS.md)")
    return parser


def parse_args(argv=None):
    """Parse and check the sampling flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cfg_scale < 1.0:
        parser.error("--cfg-scale must be >= 1.0")
    if args.heun and args.mode != "ode":
        parser.error("--heun is only available with --mode ode")
    if args.guidance_low > args.guidance_high:
        parser.error(f"--guidance-low {args.guidance_low} is above --guidance-high {args.guidance_high}: guidance "
                     "applies while guidance_low <= t <= guidance_high")
    return args


def setup_distributed():
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); a plain `python` run is one process."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", int(os.environ["RANK"]) % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
    # generous timeout: on a restart, processes with fewer missing images wait longer at the final barrier
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def resolve_checkpoint(args, rank):
    """(checkpoint file, experiment name, 7-digit step) from --ckpt or --exp-path / --train-steps."""
    from weights.checkpoint import checkpoint_file, list_checkpoints
    from weights.hub import resolve_weights

    if args.ckpt is not None:
        ckpt = resolve_weights(args.ckpt)
        named = Path(args.ckpt)  # the name as given: a hub id names the run after its repo, not the cache folder
        if args.exp_path is not None:
            exp_name = os.path.basename(os.path.normpath(args.exp_path))
        else:
            exp_name = named.parent.parent.name if named.parent.name == "checkpoints" else named.stem
        step = args.train_steps if args.train_steps is not None else ckpt.stem
        return ckpt, exp_name, str(step).zfill(7)
    if args.exp_path is None:
        if rank == 0:
            print(f"--exp-path not given: sampling the default {DEFAULT_EXP_PATH}")
        args.exp_path = DEFAULT_EXP_PATH
        args.train_steps = args.train_steps or DEFAULT_TRAIN_STEPS
    if args.train_steps is None:
        if not Path(args.exp_path).is_dir():
            raise UserError(f"--exp-path {args.exp_path}: no such folder; pass the folder of a training run")
        steps = list_checkpoints(args.exp_path)
        if not steps:
            raise UserError(f"no checkpoints in {Path(args.exp_path) / 'checkpoints'}: pass --train-steps or --ckpt")
        args.train_steps = str(steps[-1])
    step = str(args.train_steps).zfill(7)
    return checkpoint_file(args.exp_path, int(step)), os.path.basename(os.path.normpath(args.exp_path)), step


def sampling_settings(args, world_size):
    """Everything besides the folder name that decides the images."""
    keys = ("global_seed", "pproc_batch_size", "mode", "num_steps", "heun", "path_type", "cfg_scale",
            "guidance_low", "guidance_high", "vae_ckpt")
    return dict({key: getattr(args, key) for key in keys}, world_size=world_size)


def npz_settings(args, world_size, ckpt_path, step):
    """What decides the .npz: the sampling settings, the checkpoint and its step, the number of images."""
    return dict(sampling_settings(args, world_size), checkpoint=str(Path(ckpt_path).resolve()), step=step,
                num_fid_samples=args.num_fid_samples)


def npz_settings_file(npz):
    """SAMPLE_DIR/NAME.settings.json beside SAMPLE_DIR/NAME.npz."""
    return npz.with_name(npz.name.removesuffix(".npz") + NPZ_SETTINGS_SUFFIX)


def differences(recorded, now):
    """'key: RECORDED recorded, NOW now' for every setting that differs, or an empty string."""
    return "; ".join(f"{key}: {recorded.get(key)!r} recorded, {value!r} now"
                     for key, value in now.items() if recorded.get(key) != value)


def prepare_folder(folder, settings, npz_record, ckpt_path):
    """On rank 0, before anything is loaded or written: ("done", message) if the .npz exists with the same (or
    unknown) settings, ("error", message) if sampling cannot start, else ("run", None)."""
    from weights.checkpoint import folder_given_as_file

    npz = folder.with_name(folder.name + ".npz")
    if npz.is_file():
        record = npz_settings_file(npz)
        if not record.is_file():
            return "done", (f"Skipping sampling as {npz} already exists (its settings are unknown: no {record.name} "
                            "beside it).")
        changed = differences(read_json(record), npz_record)
        if changed:
            return "error", (f"{npz} was made with other settings ({changed}): pass another --sample-dir, or remove "
                             f"{npz} to sample again")
        return "done", f"Skipping sampling as {npz} already exists."
    if ckpt_path.is_dir():
        return "error", folder_given_as_file(ckpt_path)
    if not ckpt_path.is_file():
        return "error", f"checkpoint not found: {ckpt_path}"
    path = folder / SETTINGS_FILE
    if path.is_file():
        changed = differences(read_json(path), settings)
        if changed:
            return "error", (f"{folder} holds samples made with other settings ({changed}): remove the folder or "
                             "pass another --sample-dir")
    return "run", None


def record_settings(folder, settings):
    """Write SETTINGS_FILE into the sample folder unless it is there (prepare_folder checked that it matches)."""
    from utils.files import atomic_write

    path = folder / SETTINGS_FILE
    if not path.is_file():
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=2) + "\n")


def save_png(image, path):
    """Write a PNG atomically, so an interrupted run never leaves a truncated file that looks finished."""
    from PIL import Image

    from utils.files import atomic_write

    with atomic_write(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def sample_pngs(args, model, decode, folder, rank, world_size, seed, shape):
    """Sample this process's share: one seed, batch b's image i numbered i * world + rank + b * global."""
    from tqdm import tqdm

    from sampling.generation import num_batches, sample_batches

    n = args.pproc_batch_size
    global_batch = n * world_size
    iterations = num_batches(args.num_fid_samples, global_batch)
    if rank == 0:
        print(f"Total number of images that will be sampled: {iterations * global_batch}")

    def paths(batch):
        return [folder / f"{i * world_size + rank + batch * global_batch:06d}.png" for i in range(n)]

    batches = sample_batches(model, decode, shape, seed=seed, num_batches=iterations, batch_size=n, mode=args.mode,
                             num_steps=args.num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
                             guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                             path_type=args.path_type, skip=lambda batch: all(path.is_file() for path in paths(batch)))
    for batch, images in tqdm(batches, total=iterations, disable=rank != 0):
        for image, path in zip(images, paths(batch)):
            save_png(image, path)


def create_npz(folder, num, record):
    """Pack folder/000000.png ... into folder.npz with arr_0 uint8 (num, H, W, 3), and `record` into
    NAME.settings.json beside it, each written atomically (the record first: a .npz never comes without it)."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from utils.files import atomic_write

    with Image.open(folder / f"{0:06d}.png") as first:
        shape = np.asarray(first).shape
    samples = np.empty((num, *shape), dtype=np.uint8)
    for i in tqdm(range(num), desc="Building .npz file from samples"):
        with Image.open(folder / f"{i:06d}.png") as image:
            samples[i] = np.asarray(image)
    npz = folder.with_name(folder.name + ".npz")
    with atomic_write(npz_settings_file(npz)) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    with atomic_write(npz) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, arr_0=samples)  # through a handle: given a path, np.savez would append .npz to it
    print(f"Saved .npz file to {npz} [shape={samples.shape}].")
    return npz


def run(args, rank, world_size, device):
    """Sample (or finish sampling) and return the .npz path."""
    import torch.distributed as dist

    from sampling.generation import process_seed
    from sampling.samplers import compile_inference
    from training.distributed import from_main_process
    from weights.latent_stats import latent_decoder
    from weights.training_checkpoint import load_for_sampling

    ckpt_path, exp_name, step = resolve_checkpoint(args, rank)
    folder = Path(f"{args.sample_dir}/{exp_name}_{step}_cfg{args.cfg_scale}-{args.guidance_low}-{args.guidance_high}")
    settings, record = sampling_settings(args, world_size), npz_settings(args, world_size, ckpt_path, step)
    status, detail = from_main_process(prepare_folder(folder, settings, record, ckpt_path) if rank == 0 else None)
    if status == "done":
        if rank == 0:
            print(detail)
        return folder.with_name(folder.name + ".npz")
    if status == "error":
        raise UserError(detail)

    model, vae, stats, shape = load_for_sampling(ckpt_path, exp_path=args.exp_path, vae_ckpt=args.vae_ckpt,
                                                    device=device)
    if args.compile:
        compile_inference(model)
    if rank == 0:  # everything loaded: only now is anything written
        record_settings(folder, settings)

    seed = process_seed(args.global_seed, rank, world_size)  # REPA-E's, to reproduce its samples
    print(f"Starting rank={rank}, seed={seed}, world_size={world_size}; saving .png samples at {folder}")
    sample_pngs(args, model, latent_decoder(vae, stats), folder, rank, world_size, seed, shape)
    if dist.is_initialized():
        dist.barrier()  # every PNG is on disk before rank 0 packs them
    npz = folder.with_name(folder.name + ".npz")
    if rank == 0:
        create_npz(folder, args.num_fid_samples, record)
    return npz


def main(argv=None):
    """Entry point for torchrun or plain python."""
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    rank, world_size, device = setup_distributed()
    try:
        return run(args, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    report_user_errors(main)()
