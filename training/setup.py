"""Starting a training run, writing nothing: flag checks, torch settings, the accelerator, the resume checkpoint,
the dataset check, the loss config and the data loader.
"""
import warnings
from pathlib import Path

import torch
from accelerate.utils import ProjectConfiguration
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dataset.sampler import ResumableDistributedSampler
from training.distributed import launched_accelerator, on_main_process
from training.flags import check_training_args
from training.tracking import check_trackers, tracker_names
from utils.errors import UserError
from utils.files import read_json
from weights.checkpoint import (
    checkpoint_file,
    list_checkpoints,
    newest_readable_checkpoint,
)


def configure_torch(*, allow_tf32, compile):
    """Process-wide torch settings of a training run: TF32 matmuls on GPUs, and dynamo cache room for compiled
    modules (switching the SiT between train and eval mode within a step recompiles it)."""
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    if compile:
        torch._dynamo.config.cache_size_limit = 64
        torch._dynamo.config.accumulated_cache_size_limit = 512


def make_accelerator(*, mixed_precision, gradient_accumulation_steps, report_to, logging_dir):
    """Accelerator with the run's precision, accumulation and trackers (their files under logging_dir).

    accelerate runs fp16 only on GPUs; on a CPU this enables the same path itself (float16 autocast and a gradient
    scaler), so that it can be run and tested without a GPU.
    """
    accelerator = launched_accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                                       mixed_precision=mixed_precision, log_with=tracker_names(report_to),
                                       project_config=ProjectConfiguration(logging_dir=str(logging_dir)))
    if mixed_precision == "fp16" and accelerator.scaler is None:
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    return accelerator


def start_run(args):
    """What every training run does first, writing nothing: check the flags, set torch up, make the accelerator
    (trackers under OUTPUT_DIR/LOGGING_DIR/EXP_NAME) and find the checkpoint to resume from (decided on process 0).
    Returns (accelerator, exp_dir, resume_path or None)."""
    check_training_args(args)
    check_trackers(tracker_names(args.report_to))
    configure_torch(allow_tf32=args.allow_tf32, compile=args.compile)
    exp_dir = Path(args.output_dir) / args.exp_name
    accelerator = make_accelerator(mixed_precision=args.mixed_precision,
                                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                                   report_to=args.report_to, logging_dir=Path(args.output_dir, args.logging_dir,
                                                                              args.exp_name))
    resume_path = on_main_process(lambda: find_resume_checkpoint(
        exp_dir, trainer=args.trainer, resume_step=args.resume_step,
        continue_train_exp_dir=args.continue_train_exp_dir, resume_latest=args.resume_latest))
    return accelerator, exp_dir, resume_path


def check_dataset(dataset, *, resolution, global_batch_size, num_processes, num_classes):
    """The images fit --resolution, their labels --num-classes, and the batch fits the processes and the dataset;
    UserError otherwise."""
    if global_batch_size % num_processes:
        raise UserError(f"--batch-size {global_batch_size} is not divisible by the {num_processes} processes: "
                        f"pass a multiple of {num_processes}")
    if len(dataset) < global_batch_size:
        raise UserError(f"--batch-size {global_batch_size} is larger than the {len(dataset)} images in "
                        f"{dataset.data_dir}")
    height, width = dataset.image_size
    if (height, width) != (resolution, resolution):
        raise UserError(f"--resolution {resolution} does not match the {height}x{width} images in {dataset.data_dir}: "
                        f"pass --resolution {height} or run preprocessing.py with --resolution {resolution}")
    classes = int(dataset.labels.max()) + 1
    if classes > num_classes:  # label num_classes is the null (unconditional) label
        raise UserError(f"--num-classes {num_classes} is fewer than the {classes} classes (labels 0..{classes - 1}) "
                        f"of the images in {dataset.data_dir}: pass --num-classes {classes} or more")


def load_loss_config(path, flag):
    """The VAE regularizer's config (an OmegaConf YAML file with a `losses` section); UserError if it is not one."""
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # YAML syntax, unreadable file: all the user's to fix
        raise UserError(f"{flag} {path}: not a readable YAML file ({str(error).splitlines()[0]})") from error
    if "losses" not in config:
        raise UserError(f"{flag} {path}: no `losses` section; start from configs/l1_lpips_kl_gan.yaml")
    return config


def make_dataloader(dataset, *, global_batch_size, accelerator, seed, num_workers):
    """DataLoader over this process's share of a seeded, resumable shuffle (the batch checked by check_dataset);
    returns (loader, sampler)."""
    local_batch_size = global_batch_size // accelerator.num_processes
    sampler = ResumableDistributedSampler(dataset, num_replicas=accelerator.num_processes,
                                          rank=accelerator.process_index, seed=seed)
    loader = DataLoader(dataset, batch_size=local_batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # keeps the global random stream resumable
    return loader, sampler


def experiment_trainer(exp_dir):
    """The trainer script that made an experiment folder (its args.json), or None for a folder without one."""
    args_file = Path(exp_dir) / "args.json"
    if not args_file.is_file():
        return None
    config = read_json(args_file, "remove it, or choose another --exp-name")
    if "trainer" in config:
        return config["trainer"]
    return "train_ldm_only.py" if "vae_latents_name" in config else "train_repae.py"  # written before the record


def find_resume_checkpoint(exp_dir, *, trainer, resume_step, continue_train_exp_dir, resume_latest):
    """Checkpoint to resume from (--resume-step, or the newest readable one with --resume-latest), or None.

    A fresh run refuses to start in an experiment folder that already holds checkpoints, so none is overwritten; an
    experiment folder belongs to the trainer that made it.
    """
    exp_dir = Path(exp_dir)
    source_dir = Path(continue_train_exp_dir) if continue_train_exp_dir else exp_dir
    for folder, flag in ((exp_dir, "--exp-name"), (source_dir, "--continue-train-exp-dir")):
        owner = experiment_trainer(folder)
        if owner not in (None, trainer):
            raise UserError(f"{flag}: {folder} is an experiment of {owner}, not of {trainer}: choose another "
                            f"{flag}")
    if resume_step > 0:
        path = checkpoint_file(source_dir, resume_step)
        if not path.is_file():
            raise UserError(f"--resume-step {resume_step}: {path} does not exist")
        return path
    if resume_latest:
        path, unreadable = newest_readable_checkpoint(source_dir)
        for skipped, reason in unreadable:
            warnings.warn(f"--resume-latest: skipping unreadable checkpoint {skipped} ({reason})")
        return path
    if list_checkpoints(exp_dir):
        raise UserError(
            f"{exp_dir} already holds checkpoints (up to step {list_checkpoints(exp_dir)[-1]}); pass --resume-latest "
            f"to continue that run or choose another --exp-name")
    return None
