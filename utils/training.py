"""Pieces shared by train_repae.py and train_ldm_only.py: setup, data, checkpoints, resume, logs, sample grids."""
import json
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, extract_model_from_parallel
from torch.utils.data import DataLoader

from models.autoencoder import vae_geometry
from models.encoders import encoder_patch_tokens, load_encoders, preprocess_raw_image
from models.sit import SiT_models
from utils.checkpoint import (
    assert_finite, atomic_save, capture_rng_state, checkpoint_file, list_checkpoints, load_file,
    load_state_dict_strict, prune_checkpoints, restore_rng_state,
)
from utils.data import ResumableDistributedSampler
from utils.distributed import all_gather_objects, convert_global_batchnorm, on_main_process
from utils.latents import denormalize_latents
from utils.samplers import euler_sampler
from utils.tracking import create_logger, save_sample_grid, tracker_names


def make_accelerator(args):
    """Accelerator with the run's precision, accumulation and trackers; fp16 falls back to fp32 without CUDA."""
    mixed_precision = args.mixed_precision
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("--mixed-precision fp16 needs CUDA; running in float32 (use bf16 for CPU autocast)")
        mixed_precision = "no"
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir)))
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed_precision,
                       log_with=tracker_names(args.report_to), project_config=project)


def setup_experiment(args, accelerator):
    """Decide the resume checkpoint, then create EXP = output_dir/exp_name with args.json and log.txt.

    Returns (exp_dir, logger, resume_path). Process 0 decides and tells the others, so all agree; a refused start
    (see resolve_resume) writes nothing.
    """
    exp_dir = Path(args.output_dir) / args.exp_name
    resume_path = on_main_process(lambda: resolve_resume(args, exp_dir))
    if accelerator.is_main_process:
        (exp_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        with open(exp_dir / "args.json", "w") as handle:
            json.dump(vars(args), handle, indent=4)
    accelerator.wait_for_everyone()
    logger = create_logger(exp_dir, accelerator.is_main_process)
    logger.info(f"Experiment directory: {exp_dir}")
    return exp_dir, logger, resume_path


def resolve_resume(args, exp_dir):
    """Checkpoint to resume from (--resume-step or --resume-latest), or None for a fresh run.

    A fresh run refuses to start in an experiment folder that already holds checkpoints, so none is overwritten.
    """
    source_dir = Path(args.continue_train_exp_dir) if args.continue_train_exp_dir else exp_dir
    if args.resume_step > 0:
        path = checkpoint_file(source_dir, args.resume_step)
        if not path.is_file():
            raise FileNotFoundError(f"--resume-step {args.resume_step}: {path} does not exist")
        return path
    steps = list_checkpoints(source_dir)
    if args.resume_latest:
        return checkpoint_file(source_dir, steps[-1]) if steps else None
    if list_checkpoints(exp_dir):
        raise FileExistsError(
            f"{exp_dir} already holds checkpoints (up to step {list_checkpoints(exp_dir)[-1]}); pass --resume-latest "
            f"to continue that run or choose another --exp-name")
    return None


def latent_geometry(vae, resolution):
    """(latent size, latent channels) of images at this resolution through the VAE layout."""
    factor, channels = vae_geometry[vae]
    return resolution // factor, channels


def build_encoders_and_sit(args, device):
    """The frozen encoders and a SiT with one projector per encoder, sized for the run's latents."""
    latent_size, in_channels = latent_geometry(args.vae, args.resolution)
    encoders, encoder_types, _ = load_encoders(
        args.enc_type, device, args.resolution, ckpt=args.enc_ckpt, random_init=args.enc_random_init)
    model = SiT_models[args.model](
        input_size=latent_size, in_channels=in_channels, num_classes=args.num_classes,
        class_dropout_prob=args.cfg_prob, z_dims=[encoder.embed_dim for encoder in encoders],
        encoder_depth=args.encoder_depth, bn_momentum=args.bn_momentum,
        qk_norm=args.qk_norm, fused_attn=args.fused_attn,
    ).to(device)
    return encoders, encoder_types, model


def make_optimizer(params, lr, args):
    """AdamW with the run's betas, epsilon and weight decay."""
    return torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def make_dataloader(dataset, args, accelerator):
    """DataLoader over this process's share of a seeded, resumable shuffle; returns (loader, sampler)."""
    local_batch_size = args.batch_size // accelerator.num_processes
    if local_batch_size < 1 or len(dataset) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} does not fit {accelerator.num_processes} processes "
                         f"and {len(dataset)} images in {args.data_dir}")
    sampler = ResumableDistributedSampler(dataset, num_replicas=accelerator.num_processes,
                                          rank=accelerator.process_index, seed=args.seed)
    loader = DataLoader(dataset, batch_size=local_batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # keeps the global random stream resumable
    return loader, sampler


def start_epoch(sampler, loader, epoch, data_state):
    """Point the sampler at this epoch, skipping the batches a resumed run already consumed; return the first index."""
    start_batch = data_state["batch_in_epoch"] if epoch == data_state["epoch"] else 0
    sampler.set_epoch(epoch, start_index=start_batch * loader.batch_size)
    return start_batch


def unwrap(module):
    """The plain module behind DDP and torch.compile wrappers, in either order (the module is not changed)."""
    module = extract_model_from_parallel(module, keep_fp32_wrapper=True)
    while hasattr(module, "_orig_mod"):
        module = module._orig_mod
    return module


def compile_modules(*modules):
    """torch.compile each module, with the published dynamo cache limits (train/eval switches recompile)."""
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    return [torch.compile(module) for module in modules]


def sync_batchnorm(model, accelerator):
    """Batch-norm statistics over the global batch when several processes train: SyncBatchNorm on CUDA as
    published, GlobalBatchNorm2d (same numbers) elsewhere, e.g. gloo on CPU."""
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


def guarded_update(accelerator, loss, parameters, optimizer, guard, name, max_grad_norm):
    """Backward; on an optimization step, clip and step unless the loss or gradient norm is non-finite.

    Returns the gradient norm (None while accumulating). Under fp16 the gradient scaler skips non-finite steps
    itself (and lowers its scale), so the optimizer is always called then.
    """
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return None
    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    if guard.is_finite(name, loss, grad_norm) or accelerator.scaler is not None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def reduce_logs(logs, accelerator):
    """Average scalar metrics over processes with one collective; returns floats."""
    names = list(logs)
    values = torch.stack([torch.as_tensor(logs[n], dtype=torch.float32, device=accelerator.device).detach().reshape(())
                          for n in names])
    values = accelerator.reduce(values, "mean")
    return dict(zip(names, values.tolist()))


def loss_line(step, logs, keys=("sit_loss", "denoising_loss", "proj_loss", "vae_loss", "vae_align_loss", "d_loss")):
    """One log line with the main losses of a step."""
    return f"step {step}: " + ", ".join(f"{k}={logs[k]:.4f}" for k in keys if k in logs)


def save_training_state(exp_dir, args, accelerator, modules, optimizers, guard, data_state, extra=None):
    """Write EXP/checkpoints/%07d.pt in the published layout plus what an exact resume needs; all processes call it.

    modules: checkpoint key -> plain module (published keys: model, ema, vae, discriminator).
    optimizers: checkpoint key -> optimizer (opt, opt_vae, opt_disc). Extra keys: rng (per process), data, guard,
    scaler and `extra`. Non-finite weights are refused.
    """
    path = checkpoint_file(exp_dir, data_state["steps"])
    checkpoint = {key: module.state_dict() for key, module in modules.items()}
    assert_finite(checkpoint, path)  # on every process (their weights are the same), so all stop together
    rng_states = all_gather_objects(capture_rng_state())
    if accelerator.is_main_process:
        checkpoint.update({key: opt.state_dict() for key, opt in optimizers.items()})
        checkpoint.update(args=args, steps=data_state["steps"], rng=rng_states, guard=guard.state_dict(),
                          data={"epoch": data_state["epoch"], "batch_in_epoch": data_state["batch_in_epoch"],
                                "layout": data_layout(args, accelerator)})
        if accelerator.scaler is not None:
            checkpoint["scaler"] = accelerator.scaler.state_dict()
        checkpoint.update(extra or {})
        atomic_save(checkpoint, path)
        prune_checkpoints(exp_dir, args.keep_last_checkpoints)
    accelerator.wait_for_everyone()
    return path


def data_layout(args, accelerator):
    """What a saved data position depends on: the number of processes and the per-process batch size."""
    return [accelerator.num_processes, args.batch_size // accelerator.num_processes]


def restore_training_state(path, args, accelerator, modules, optimizers, guard, batches_per_epoch):
    """Load a checkpoint written by save_training_state (or by the published code) into the run.

    Returns (data_state, checkpoint). A checkpoint without random or data state for this run's layout (published
    checkpoints, or another process count or batch size) continues at the position its step count implies, with
    random streams seeded from the step: the run goes on, but does not repeat an uninterrupted one exactly.
    """
    checkpoint = load_file(path)
    for key, module in modules.items():
        load_state_dict_strict(module, checkpoint[key], f"{path} [{key}]")
    for key, opt in optimizers.items():
        opt.load_state_dict(checkpoint[key])
    if "guard" in checkpoint:
        guard.load_state_dict(checkpoint["guard"])
    if "scaler" in checkpoint and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(checkpoint["scaler"])
    steps, data = checkpoint["steps"], checkpoint.get("data")
    if data is not None and data.get("layout") == data_layout(args, accelerator) and "rng" in checkpoint:
        restore_rng_state(checkpoint["rng"][accelerator.process_index])
        return {"steps": steps, "epoch": data["epoch"], "batch_in_epoch": data["batch_in_epoch"]}, checkpoint
    warnings.warn(f"{path} holds no random and data state for {accelerator.num_processes} processes of "
                  f"batch {args.batch_size // accelerator.num_processes}; continuing from its step count")
    torch.manual_seed(args.seed + accelerator.process_index + steps * accelerator.num_processes)
    micro_batches = steps * args.gradient_accumulation_steps
    return {"steps": steps, "epoch": micro_batches // batches_per_epoch,
            "batch_in_epoch": micro_batches % batches_per_epoch}, checkpoint


@torch.no_grad()
def sample_grid(ema, vae, args, accelerator, exp_dir, step):
    """EMA samples of fixed labels and noise (Euler, 50 steps, CFG 4.0), decoded and saved as EXP/samples/%07d.png."""
    latent_size, in_channels = latent_geometry(args.vae, args.resolution)
    generator = torch.Generator().manual_seed(args.seed)
    n = args.sample_batch_size
    ys = torch.randint(args.num_classes, (n,), generator=generator)
    xT = torch.randn((n, in_channels, latent_size, latent_size), generator=generator)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = slice(rank * n // world, (rank + 1) * n // world)
    was_training = vae.training
    vae.eval()
    samples = euler_sampler(ema, xT[local].to(accelerator.device), ys[local].to(accelerator.device), num_steps=50,
                            cfg_scale=4.0, guidance_low=0.0, guidance_high=1.0, path_type=args.path_type, heun=False)
    stats = ema.extract_latents_stats()
    latents = denormalize_latents(samples.float(), stats["latents_scale"].float(), stats["latents_bias"].float())
    images = (vae.decode(latents).float() + 1) / 2
    vae.train(was_training)
    images = torch.cat(all_gather_objects(images.cpu()))
    path = Path(exp_dir) / "samples" / f"{step:07d}.png"
    if accelerator.is_main_process:
        save_sample_grid(accelerator, images, path, step)
    accelerator.wait_for_everyone()
    return path


def finish_step(step, logs, data_state, *, args, accelerator, exp_dir, logger, progress_bar, modules, optimizers,
                guard, vae, extra=None):
    """Close one optimization step: the guard's count, metrics averaged over processes (progress bar, trackers),
    a checkpoint every --checkpointing-steps and at the last step, an EMA sample grid at step 1 and every
    --sampling-steps. All processes call it."""
    guard.end_step(step)
    logs = reduce_logs(logs, accelerator)
    logs.update(epoch=data_state["epoch"], skipped_updates=guard.skipped)
    progress_bar.update(1)
    progress_bar.set_postfix({k: f"{logs[k]:.4f}" for k in ("sit_loss", "proj_loss", "vae_loss") if k in logs})
    accelerator.log(logs, step=step)
    if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
        path = save_training_state(exp_dir, args, accelerator, modules, optimizers, guard, data_state, extra)
        logger.info(f"Saved checkpoint to {path}; {loss_line(step, logs)}")
    if step == 1 or step % args.sampling_steps == 0:
        path = sample_grid(modules["ema"], vae, args, accelerator, exp_dir, step)
        logger.info(f"Saved EMA sample grid to {path}")


def finish_training(accelerator, logger, step, guard):
    """Wait for every process, log the end and close the trackers."""
    accelerator.wait_for_everyone()
    logger.info(f"Done: {step} steps, {guard.skipped} skipped updates")
    accelerator.end_training()
