"""REPA-E: end-to-end training of a SiT together with its VAE.

Per batch: (1) frozen-encoder features, (2) VAE forward, (3) VAE step on its regularizer plus the REPA
alignment loss through the frozen SiT, (4) discriminator step, (5) SiT step on the detached latent
(stop-gradient) with the same time and noise, (6) EMA of the SiT.

    accelerate launch train_repae.py --exp-name repae-sit-xl-2 --model SiT-XL/2 --vae f8d4 \
        --vae-ckpt pretrained/sdvae/sdvae-f8d4.pt --enc-type dinov2-vit-b --batch-size 256
"""
import argparse
import copy

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from loss.vae_loss import ReconstructionLoss_Single_Stage
from utils.checkpoint import load_file, load_state_dict_strict
from utils.hub import resolve_weights
from utils.cli import add_training_args, validate_training_args
from utils.data import ImageDataset
from utils.ema import requires_grad, update_ema
from utils.guard import NonFiniteGuard
from utils.latents import estimate_latents_stats, load_vae, preprocess_imgs_vae
from utils.training import (
    build_encoders_and_sit, compile_modules, encoder_features, finish_step, finish_training, guarded_update,
    make_accelerator, make_dataloader, make_optimizer, restore_training_state, setup_experiment, start_epoch,
    sync_batchnorm, unwrap,
)


def latent_channel_stats(z):
    """Per-channel mean and std of a latent batch, the signal of the latent collapse the paper describes."""
    z = z.detach().float()
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    logs = {f"latent_mean/c{i}": m for i, m in enumerate(mean)}
    logs.update({f"latent_std/c{i}": s for i, s in enumerate(std)})
    logs["latent_std_min"] = std.min()
    return logs


def loss_buffers(vae_loss_fn):
    """Buffers the loss function owns itself (LeCam EMAs), not those of its discriminator or LPIPS net."""
    return {name: buffer for name, buffer in vae_loss_fn.named_buffers(recurse=False)}


def main(args):
    """Train SiT and VAE end to end with the published recipe."""
    accelerator = make_accelerator(args)
    exp_dir, logger, resume_path = setup_experiment(args, accelerator)
    device = accelerator.device

    # Models are built from the same seed on every process; each process then gets its own random stream.
    set_seed(args.seed)
    encoders, encoder_types, model = build_encoders_and_sit(args, device)
    vae, latents_stats = load_vae(args.vae, args.vae_ckpt, require_stats=False)
    vae = vae.to(device)
    vae_loss_fn = ReconstructionLoss_Single_Stage(
        OmegaConf.load(args.loss_cfg_path), pretrained_lpips=not args.lpips_random_init).to(device)
    if args.disc_pretrained_ckpt:
        disc_ckpt = resolve_weights(args.disc_pretrained_ckpt, kind="discriminator")
        load_state_dict_strict(vae_loss_fn.discriminator, load_file(disc_ckpt), args.disc_pretrained_ckpt)
        logger.info(f"Loaded discriminator from {args.disc_pretrained_ckpt}")
    logger.info(f"SiT parameters: {sum(p.numel() for p in model.parameters()):,}; "
                f"VAE parameters: {sum(p.numel() for p in vae.parameters()):,}")

    dataset = ImageDataset(args.data_dir)
    dataloader, sampler = make_dataloader(dataset, args, accelerator)
    logger.info(f"Dataset contains {len(dataset):,} images ({args.data_dir})")
    if latents_stats is None:
        logger.warning("no latent statistics: estimating them from the first batches (smoke runs only)")
        batches = [images for images, _ in zip((batch[0] for batch in dataloader), range(4))]
        latents_stats = {k: accelerator.reduce(v, "mean") for k, v in estimate_latents_stats(vae, batches, device).items()}
    model.init_bn(latents_stats["latents_scale"].to(device), latents_stats["latents_bias"].to(device))
    ema = copy.deepcopy(model).eval()
    requires_grad(ema, False)

    model = sync_batchnorm(model, accelerator)
    optimizer = make_optimizer(model.parameters(), args.learning_rate, args)
    optimizer_vae = make_optimizer(vae.parameters(), args.vae_learning_rate, args)
    optimizer_loss_fn = make_optimizer(vae_loss_fn.parameters(), args.disc_learning_rate, args)
    if args.compile:
        model, vae, vae_loss_fn = compile_modules(model, vae, vae_loss_fn)
    model, vae, vae_loss_fn, optimizer, optimizer_vae, optimizer_loss_fn = accelerator.prepare(
        model, vae, vae_loss_fn, optimizer, optimizer_vae, optimizer_loss_fn)

    # Checkpoint keys as published; the loss function's own buffers (LeCam statistics) ride along.
    modules = {"model": unwrap(model), "ema": ema, "vae": unwrap(vae), "discriminator": unwrap(vae_loss_fn).discriminator}
    optimizers = {"opt": optimizer, "opt_vae": optimizer_vae, "opt_disc": optimizer_loss_fn}
    guard = NonFiniteGuard(args.max_nonfinite_steps, logger)
    state = {"steps": 0, "epoch": 0, "batch_in_epoch": 0}
    set_seed(args.seed + accelerator.process_index)
    if resume_path is not None:
        state, checkpoint = restore_training_state(resume_path, args, accelerator, modules, optimizers, guard,
                                                   len(dataloader))
        for name, buffer in loss_buffers(unwrap(vae_loss_fn)).items():
            buffer.copy_(checkpoint.get("vae_loss_buffers", {}).get(name, buffer))
        logger.info(f"Resumed from {resume_path} at step {state['steps']}")
    global_step = state["steps"]

    accelerator.init_trackers("REPA-E", config=vars(copy.deepcopy(args)),
                              init_kwargs={"wandb": {"name": args.exp_name}})
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    loss_kwargs = dict(path_type=args.path_type, prediction=args.prediction, weighting=args.weighting)
    # Frozen for the VAE step and trainable again after it. Unlike the published code, which turns every SiT
    # parameter back on, the fixed sin-cos position embedding stays fixed (it drifted, unsynchronised across
    # processes, in the published runs).
    sit_trainable = [param for param in model.parameters() if param.requires_grad]

    for epoch in range(state["epoch"], args.epochs):
        start_batch = start_epoch(sampler, dataloader, epoch, state)
        for batch_in_epoch, (raw_image, labels) in enumerate(dataloader, start=start_batch):
            if global_step >= args.max_train_steps:
                break
            raw_image, labels = raw_image.to(device), labels.to(device)
            zs = encoder_features(encoders, encoder_types, raw_image, accelerator)
            vae.train(not args.freeze_vae)
            with accelerator.accumulate(model, vae, vae_loss_fn), accelerator.autocast():
                # 1) VAE forward.
                processed_image = preprocess_imgs_vae(raw_image)
                with torch.set_grad_enabled(not args.freeze_vae):
                    posterior, z, recon_image = vae(processed_image)

                # 2) VAE step: regularizer + REPA alignment through the frozen SiT (running batch-norm statistics).
                requires_grad(sit_trainable, False)
                model.eval()
                if args.freeze_vae:
                    vae_align = model(x=z, y=labels, zs=zs, loss_kwargs=loss_kwargs, align_only=True)
                else:
                    vae_loss, vae_loss_dict = vae_loss_fn(processed_image, recon_image, posterior, global_step, "generator")
                    vae_align = model(x=z, y=labels, zs=zs, loss_kwargs=loss_kwargs,
                                      align_only=not args.diffusion_loss_to_vae)
                    vae_loss = vae_loss.mean() + args.vae_align_proj_coeff * vae_align["proj_loss"].mean()
                    if args.diffusion_loss_to_vae:
                        vae_loss = vae_loss + vae_align["denoising_loss"].mean()
                    grad_norm_vae = guarded_update(accelerator, vae_loss, vae.parameters(), optimizer_vae, guard,
                                                   "VAE loss/gradient", args.max_grad_norm)

                    # 3) Discriminator step on real images and detached reconstructions.
                    d_loss, d_loss_dict = vae_loss_fn(processed_image, recon_image, posterior, global_step, "discriminator")
                    grad_norm_disc = guarded_update(accelerator, d_loss, vae_loss_fn.parameters(), optimizer_loss_fn,
                                                    guard, "discriminator loss/gradient", args.max_grad_norm)

                # 4) SiT step on the detached latent with the same time and noise; batch-norm in training mode.
                requires_grad(sit_trainable, True)
                model.train()
                sit_outputs = model(x=z.detach(), y=labels, zs=zs, loss_kwargs=loss_kwargs,
                                    time_input=vae_align["time_input"], noises=vae_align["noises"])
                sit_loss = sit_outputs["denoising_loss"].mean() + args.proj_coeff * sit_outputs["proj_loss"].mean()
                grad_norm_sit = guarded_update(accelerator, sit_loss, model.parameters(), optimizer, guard,
                                               "SiT loss/gradient", args.max_grad_norm)

            if not accelerator.sync_gradients:
                continue
            # 5) EMA of the SiT, then bookkeeping for one optimization step.
            update_ema(ema, unwrap(model), args.ema_decay)
            global_step += 1
            state = {"steps": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch + 1}
            logs = {"sit_loss": sit_loss, "denoising_loss": sit_outputs["denoising_loss"].mean(),
                    "proj_loss": sit_outputs["proj_loss"].mean(), "grad_norm_sit": grad_norm_sit,
                    "vae_align_loss": vae_align["proj_loss"].mean()}
            if not args.freeze_vae:
                logs.update({"vae_loss": vae_loss, "grad_norm_vae": grad_norm_vae, "d_loss": d_loss,
                             "grad_norm_disc": grad_norm_disc})
                logs.update({k: v.mean() for k, v in vae_loss_dict.items() if k != "total_loss"})
                logs.update({k: v.mean() for k, v in d_loss_dict.items() if k != "discriminator_loss"})
            if args.log_latent_stats:
                logs.update(latent_channel_stats(z))
            finish_step(global_step, logs, state, args=args, accelerator=accelerator, exp_dir=exp_dir, logger=logger,
                        progress_bar=progress_bar, modules=modules, optimizers=optimizers, guard=guard,
                        vae=unwrap(vae), extra={"vae_loss_buffers": loss_buffers(unwrap(vae_loss_fn))})
        if global_step >= args.max_train_steps:
            break

    finish_training(accelerator, logger, global_step, guard)
    return state


def parse_args(input_args=None):
    """Published train_repae.py flags, plus smoke-run and ablation switches."""
    parser = argparse.ArgumentParser(description="REPA-E end-to-end training")
    add_training_args(parser, model_default="SiT-XL/2", vae_default="f8d4",
                      vae_ckpt_default="pretrained/sdvae-f8d4/sdvae-f8d4.pt")
    parser.add_argument("--bn-momentum", type=float, default=0.1)
    parser.add_argument("--cfg-prob", type=float, default=0.1)
    parser.add_argument("--disc-pretrained-ckpt", type=str, default=None,
                        help="discriminator weights: a path or a hub id (REPA-E/sdvae means its discriminator file)")
    parser.add_argument("--loss-cfg-path", type=str, default="configs/l1_lpips_kl_gan.yaml")
    parser.add_argument("--vae-learning-rate", type=float, default=1e-4)
    parser.add_argument("--disc-learning-rate", type=float, default=1e-4)
    parser.add_argument("--vae-align-proj-coeff", type=float, default=1.5)
    parser.add_argument("--lpips-random-init", action="store_true",
                        help="random LPIPS VGG trunk when its weights are not available offline (smoke runs)")
    parser.add_argument("--diffusion-loss-to-vae", action="store_true",
                        help="ablation: no stop-gradient, the diffusion loss also trains the VAE")
    parser.add_argument("--freeze-vae", action="store_true",
                        help="ablation: keep the VAE fixed (the REPA baseline with a batch-norm normalizer)")
    parser.add_argument("--log-latent-stats", action="store_true",
                        help="log per-channel mean and std of the latents (watch for latent collapse)")
    args = parser.parse_args(input_args)
    if args.freeze_vae and args.diffusion_loss_to_vae:
        raise SystemExit("--freeze-vae and --diffusion-loss-to-vae exclude each other")
    if args.mixed_precision == "fp16" and args.gradient_accumulation_steps > 1:
        # The three optimizers share one gradient scaler whose scale may change between their updates.
        raise SystemExit("--gradient-accumulation-steps > 1 needs --mixed-precision bf16 or no (not fp16)")
    return validate_training_args(args)


if __name__ == "__main__":
    main(parse_args())
