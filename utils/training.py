"""What train_repae.py and train_ldm_only.py share: accelerator, SiT, data, guarded updates, and `TrainingRun`,
the bookkeeping of one run (experiment folder, step counter, data position, logs, checkpoints, sample grids)."""
import copy
import json
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, extract_model_from_parallel
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.encoders import encoder_patch_tokens, preprocess_raw_image
from models.sit import SiT_models
from utils.checkpoint import (
    assert_finite,
    atomic_save,
    capture_rng_state,
    checkpoint_file,
    list_checkpoints,
    load_file,
    load_state_dict_strict,
    newest_readable_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng_state,
)
from utils.cli import check_training_args
from utils.data import ResumableDistributedSampler
from utils.distributed import all_gather_objects, convert_global_batchnorm, on_main_process
from utils.errors import UserError
from utils.files import atomic_write
from utils.guard import NonFiniteGuard
from utils.latents import denormalize_latents, stats_from_batchnorm
from utils.samplers import euler_sampler
from utils.tracking import create_logger, save_sample_grid, tracker_names


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
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision,
                              log_with=tracker_names(report_to),
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
    configure_torch(allow_tf32=args.allow_tf32, compile=args.compile)
    exp_dir = Path(args.output_dir) / args.exp_name
    accelerator = make_accelerator(mixed_precision=args.mixed_precision,
                                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                                   report_to=args.report_to, logging_dir=Path(args.output_dir, args.logging_dir,
                                                                              args.exp_name))
    resume_path = on_main_process(lambda: find_resume_checkpoint(
        exp_dir, resume_step=args.resume_step, continue_train_exp_dir=args.continue_train_exp_dir,
        resume_latest=args.resume_latest))
    return accelerator, exp_dir, resume_path


def check_dataset(dataset, *, resolution, global_batch_size, num_processes):
    """The images fit --resolution and the batch fits the processes and the dataset; UserError otherwise."""
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


def load_loss_config(path, flag):
    """The VAE regularizer's config (an OmegaConf YAML file with a `losses` section); UserError if it is not one."""
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # YAML syntax, unreadable file: all the user's to fix
        raise UserError(f"{flag} {path}: not a readable YAML file ({str(error).splitlines()[0]})") from error
    if "losses" not in config:
        raise UserError(f"{flag} {path}: no `losses` section; start from configs/l1_lpips_kl_gan.yaml")
    return config


def find_resume_checkpoint(exp_dir, *, resume_step, continue_train_exp_dir, resume_latest):
    """Checkpoint to resume from (--resume-step, or the newest readable one with --resume-latest), or None.

    A fresh run refuses to start in an experiment folder that already holds checkpoints, so none is overwritten.
    """
    exp_dir = Path(exp_dir)
    source_dir = Path(continue_train_exp_dir) if continue_train_exp_dir else exp_dir
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


def build_sit(model_name, latent_shape, encoders, *, num_classes, cfg_prob, encoder_depth, bn_momentum=0.1,
              qk_norm=False, fused_attn=True):
    """A SiT for latents of latent_shape (C, h, w) with one projector per frozen encoder."""
    channels, size, _ = latent_shape
    return SiT_models[model_name](
        input_size=size, in_channels=channels, num_classes=num_classes, class_dropout_prob=cfg_prob,
        z_dims=[encoder.embed_dim for encoder in encoders], encoder_depth=encoder_depth, bn_momentum=bn_momentum,
        qk_norm=qk_norm, fused_attn=fused_attn)


def make_dataloader(dataset, *, global_batch_size, accelerator, seed, num_workers):
    """DataLoader over this process's share of a seeded, resumable shuffle; returns (loader, sampler)."""
    local_batch_size = global_batch_size // accelerator.num_processes
    if local_batch_size < 1 or len(dataset) < global_batch_size:
        raise SystemExit(f"--batch-size {global_batch_size} does not fit {accelerator.num_processes} processes "
                         f"and {len(dataset)} images")
    sampler = ResumableDistributedSampler(dataset, num_replicas=accelerator.num_processes,
                                          rank=accelerator.process_index, seed=seed)
    loader = DataLoader(dataset, batch_size=local_batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # keeps the global random stream resumable
    return loader, sampler


def unwrap(module):
    """The plain module behind DDP and torch.compile wrappers, in either order (the module is not changed)."""
    module = extract_model_from_parallel(module, keep_fp32_wrapper=True)
    while hasattr(module, "_orig_mod"):
        module = module._orig_mod
    return module


def compile_modules(*modules):
    """torch.compile each module."""
    return [torch.compile(module) for module in modules]


def sync_batchnorm(model, accelerator):
    """Batch-norm statistics over the global batch when several processes train: SyncBatchNorm on CUDA,
    GlobalBatchNorm2d (same numbers) elsewhere, e.g. gloo on CPU."""
    if accelerator.num_processes == 1:
        return model
    if accelerator.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_global_batchnorm(model)


@torch.no_grad()
def encoder_features(encoders, encoder_types, raw_image, accelerator):
    """Patch tokens of each frozen encoder for a uint8 batch."""
    with accelerator.autocast():
        return [encoder_patch_tokens(encoder, enc_type, preprocess_raw_image(raw_image, enc_type))
                for encoder, enc_type in zip(encoders, encoder_types)]


def make_adamw(params, *, lr, betas, weight_decay, eps):
    """Fused AdamW: one kernel per update, and it obeys the guard's device-side verdict (see guarded_update)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=True)


def guarded_update(accelerator, loss, parameters, optimizer, guard, name, max_grad_norm):
    """Backward; on an optimization step, clip and step unless the loss or gradient norm is non-finite.

    Returns the gradient norm (None while accumulating). The verdict stays on the device: the fused optimizer
    skips the whole update (weights, moments and step count) when its `found_inf` is set, the way torch's gradient
    scaler drives it; under fp16 the scaler sets it itself (and lowers its scale).
    """
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    nonfinite = guard.nonfinite(name, loss, grad_norm)
    if accelerator.scaler is None:
        getattr(optimizer, "optimizer", optimizer).found_inf = nonfinite.float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def sample_grid(ema, vae, accelerator, *, latent_shape, num_images, seed, path_type):
    """EMA samples of fixed labels and noise (Euler, 50 steps, CFG 4.0) decoded to [0, 1], from all processes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(ema.num_classes, (num_images,), generator=generator)
    noise = torch.randn((num_images, *latent_shape), generator=generator)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = slice(rank * num_images // world, (rank + 1) * num_images // world)
    was_training = vae.training
    vae.eval()
    samples = euler_sampler(ema, noise[local].to(accelerator.device), labels[local].to(accelerator.device),
                            num_steps=50, cfg_scale=4.0, guidance_low=0.0, guidance_high=1.0, path_type=path_type,
                            heun=False)
    stats = stats_from_batchnorm(ema.bn.running_mean, ema.bn.running_var)
    images = (vae.decode(denormalize_latents(samples.float(), stats)).float() + 1) / 2
    vae.train(was_training)
    return torch.cat(all_gather_objects(images.cpu()))


def reduce_logs(logs, accelerator):
    """Average scalar metrics over processes with one collective; returns floats."""
    names = list(logs)
    values = torch.stack([torch.as_tensor(logs[n], dtype=torch.float32, device=accelerator.device).detach().reshape(())
                          for n in names])
    values = accelerator.reduce(values, "mean")
    return dict(zip(names, values.tolist()))


def main_losses(logs, keys=("sit_loss", "denoising_loss", "proj_loss", "vae_loss", "vae_align_loss", "d_loss")):
    """The main losses of logged metrics as 'name=value, ...'."""
    return ", ".join(f"{key}={logs[key]:.4f}" for key in keys if key in logs)


class TrainingRun:
    """One run's bookkeeping, the same for both trainers: EXP = output_dir/exp_name with its args and log.txt,
    trackers, the step counter and data position, the non-finite guard, checkpoints and sample grids.

    Every process makes one and calls each method at the same point of the loop (process 0 writes). Nothing is
    written before `open`, so a run refused by its checks (or by `resume`) leaves no trace.
    """

    def __init__(self, accelerator, exp_dir, *, config, local_batch_size, max_train_steps, max_nonfinite_steps):
        self.accelerator = accelerator
        self.exp_dir = Path(exp_dir)
        self.config = config  # the run's flags, written to EXP and into every checkpoint ("args")
        self.data_layout = [accelerator.num_processes, local_batch_size]
        self.max_train_steps = max_train_steps
        self.logger = create_logger(None, accelerator.is_main_process)  # the console until open()
        self.guard = NonFiniteGuard(max_nonfinite_steps, self.logger)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.resumed_from = None
        self.window, self.window_steps = {}, 0  # metrics summed on the device since the last log
        self.last_logs, self.logged_step = {}, None
        self.progress_bar = None

    def open(self, project):
        """Create EXP: args.json for a new run (a resumed one keeps it and adds args-resume-STEP.json), log.txt,
        trackers; delete temporary files that killed checkpoint writes left behind."""
        if self.accelerator.is_main_process:
            checkpoints = self.exp_dir / "checkpoints"
            checkpoints.mkdir(parents=True, exist_ok=True)
            args_file = self.exp_dir / "args.json"
            if self.resumed_from is not None and args_file.is_file():
                args_file = self.exp_dir / f"args-resume-{self.step:07d}.json"
            with atomic_write(args_file) as tmp:
                tmp.write_text(json.dumps(vars(self.config), indent=4))
            stale = remove_stale_temporaries(checkpoints)
        self.accelerator.wait_for_everyone()
        self.logger = create_logger(self.exp_dir, self.accelerator.is_main_process)
        self.guard.logger = self.logger
        self.logger.info(f"Experiment directory: {self.exp_dir}")
        if self.accelerator.is_main_process and stale:
            self.logger.info(f"Deleted {len(stale)} temporary files of interrupted checkpoint writes")
        if self.resumed_from is not None:
            self.logger.info(f"Resumed from {self.resumed_from} at step {self.step}")
        self.accelerator.init_trackers(project, config=vars(copy.deepcopy(self.config)),
                                       init_kwargs={"wandb": {"name": self.config.exp_name}})

    def batches(self, loader, sampler, epochs):
        """The run's batches from its data position on, until max_train_steps steps or `epochs` epochs are done."""
        self.progress_bar = tqdm(total=self.max_train_steps, initial=self.step, desc="Steps",
                                 disable=not self.accelerator.is_local_main_process)
        for epoch in range(self.epoch, epochs):
            start = self.batch_in_epoch if epoch == self.epoch else 0
            sampler.set_epoch(epoch, start_index=start * loader.batch_size)
            for index, batch in enumerate(loader, start=start):
                if self.step >= self.max_train_steps:
                    return
                self.epoch, self.batch_in_epoch = epoch, index + 1
                yield batch

    def end_step(self, logs):
        """Count a finished optimization step and add its metrics to the logging window, on the device."""
        self.step += 1
        self.guard.end_step()
        for name, value in logs.items():
            if value is not None:
                self.window[name] = self.window.get(name, 0.0) + value.detach().float()
        self.window_steps += 1
        self.progress_bar.update(1)

    def log(self):
        """Average the window's metrics over its steps and the processes (one collective, one host read), send them
        to the progress bar and the trackers; the guard reads its counters and stops a run of non-finite steps."""
        self.guard.check(self.step)
        logs = reduce_logs({name: total / self.window_steps for name, total in self.window.items()}, self.accelerator)
        self.window, self.window_steps = {}, 0
        logs.update(epoch=self.epoch, skipped_updates=self.guard.skipped)
        self.progress_bar.set_postfix({k: f"{logs[k]:.4f}" for k in ("sit_loss", "proj_loss", "vae_loss") if k in logs})
        self.accelerator.log(logs, step=self.step)
        self.last_logs, self.logged_step = logs, self.step

    def save_checkpoint(self, modules, optimizers, *, keep_last=0, extra=None):
        """Write EXP/checkpoints/%07d.pt in the published layout plus what an exact resume needs.

        modules: checkpoint key -> plain module (model, ema, vae, discriminator); optimizers: key -> optimizer
        (opt, opt_vae, opt_disc). Beside them: args, steps, rng (per process), data position, guard, scaler and
        `extra`. Non-finite weights are refused. keep_last > 0 deletes all but the newest keep_last checkpoints.
        """
        self.guard.check(self.step)
        path = checkpoint_file(self.exp_dir, self.step)
        checkpoint = {key: module.state_dict() for key, module in modules.items()}
        assert_finite(checkpoint, path)  # on every process (their weights are the same), so all stop together
        rng_states = all_gather_objects(capture_rng_state())
        if self.accelerator.is_main_process:
            checkpoint.update({key: opt.state_dict() for key, opt in optimizers.items()})
            checkpoint.update(args=self.config, steps=self.step, rng=rng_states, guard=self.guard.state_dict(),
                              data={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                                    "layout": self.data_layout})
            if self.accelerator.scaler is not None:
                checkpoint["scaler"] = self.accelerator.scaler.state_dict()
            checkpoint.update(extra or {})
            atomic_save(checkpoint, path)
            prune_checkpoints(self.exp_dir, keep_last)
        self.accelerator.wait_for_everyone()
        losses = f"losses logged at step {self.logged_step}: {main_losses(self.last_logs)}" if self.last_logs \
            else "no losses logged yet"
        self.logger.info(f"Saved checkpoint to {path} at step {self.step}; {losses}")
        return path

    def resume(self, path, modules, optimizers, *, batches_per_epoch, seed, gradient_accumulation_steps):
        """Load a checkpoint of save_checkpoint (or of the published code) into the run; returns the checkpoint.
        A checkpoint that lacks a module or does not fit it raises UserError (before open(): nothing written).

        Without random and data state for this run's layout (published checkpoints, or another process count or
        batch size) the run continues at the data position its step count implies, with random streams seeded
        from the step: it goes on, but does not repeat an uninterrupted run exactly.
        """
        checkpoint = load_file(path)
        missing = [key for key in (*modules, *optimizers, "steps") if key not in checkpoint]
        if missing:
            raise UserError(f"{path} has no {', '.join(missing)}: it is not a checkpoint of this trainer")
        for key, module in modules.items():
            load_state_dict_strict(module, checkpoint[key], f"{path} [{key}]")
        for key, opt in optimizers.items():
            opt.load_state_dict(checkpoint[key])
        if "guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["guard"])
        if "scaler" in checkpoint and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        self.step, data = checkpoint["steps"], checkpoint.get("data")
        if data is not None and data.get("layout") == self.data_layout and "rng" in checkpoint:
            restore_rng_state(checkpoint["rng"][self.accelerator.process_index])
            self.epoch, self.batch_in_epoch = data["epoch"], data["batch_in_epoch"]
        else:
            processes, local_batch = self.data_layout
            warnings.warn(f"{path} holds no random and data state for {processes} processes of batch "
                          f"{local_batch}; continuing from its step count")
            torch.manual_seed(seed + self.accelerator.process_index + self.step * processes)
            micro_batches = self.step * gradient_accumulation_steps
            self.epoch, self.batch_in_epoch = divmod(micro_batches, batches_per_epoch)
        self.resumed_from = path
        return checkpoint

    def save_samples(self, images):
        """Write a sample grid (images in [0, 1]) as EXP/samples/%07d.png and send it to the trackers."""
        path = self.exp_dir / "samples" / f"{self.step:07d}.png"
        if self.accelerator.is_main_process:
            save_sample_grid(self.accelerator, images, path, self.step)
            self.logger.info(f"Saved EMA sample grid to {path}")
        self.accelerator.wait_for_everyone()
        return path

    def finish(self):
        """Wait for every process, log the end and close the trackers."""
        self.guard.check(self.step)
        self.accelerator.wait_for_everyone()
        self.logger.info(f"Done: {self.step} steps, {self.guard.skipped} skipped updates")
        self.accelerator.end_training()
