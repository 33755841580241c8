"""Latent diffusion only: a SiT with REPA on latents cached from a frozen (E2E-)VAE.

One step (`ldm_step`) on a batch of uint8 images, cached posterior moments and labels: frozen-encoder features of
the images, one posterior sample z = mean + std * eps, then a SiT update on z: v-prediction loss + proj_coeff * REPA
loss. The batch-norm latent normalizer is fixed at the VAE's latent statistics (eval mode); the VAE itself only
decodes the sample grids. Then the EMA of the SiT.

    python cache_latents.py --vae-arch f16d32 --vae-ckpt-path pretrained/e2e-vavae/e2e-vavae.pt \
        --vae-latents-name e2e-vavae
    accelerate launch train_ldm_only.py --exp-name sit-xl-1-e2e-vavae --model SiT-XL/1 --vae f16d32 \
        --vae-ckpt pretrained/e2e-vavae/e2e-vavae.pt --vae-latents-name e2e-vavae
"""
import argparse
from pathlib import Path

import torch
from accelerate.utils import set_seed

from utils.cli import add_training_args, validate_training_args
from utils.data import ImageLatentDataset
from utils.distributed import on_main_process
from utils.ema import make_ema, update_ema
from utils.encoder_weights import load_encoders
from utils.latents import latent_shape, load_vae, set_batchnorm_stats
from utils.training import (
    TrainingRun,
    build_sit,
    compile_modules,
    configure_torch,
    encoder_features,
    find_resume_checkpoint,
    guarded_update,
    make_accelerator,
    make_dataloader,
    sample_grid,
    unwrap,
)


def sample_posterior(moments):
    """One draw z = mean + std * eps from cached posterior moments (B, 2C, h, w): mean then std."""
    mean, std = moments.chunk(2, dim=1)
    return mean + std * torch.randn_like(mean)


def ldm_step(sit, optimizer, encoders, encoder_types, raw_image, moments, labels, accelerator, guard, *,
             loss_kwargs, proj_coeff, max_grad_norm):
    """One latent-diffusion step (module docstring); returns the step's metrics (tensors)."""
    zs = encoder_features(encoders, encoder_types, raw_image, accelerator)
    sit.train()
    unwrap(sit).bn.eval()  # the normalizer keeps the VAE's statistics
    with accelerator.accumulate(sit), accelerator.autocast():
        sit_outputs = sit(x=sample_posterior(moments), y=labels, zs=zs, loss_kwargs=loss_kwargs)
        sit_loss = sit_outputs["denoising_loss"].mean() + proj_coeff * sit_outputs["proj_loss"].mean()
        grad_norm_sit = guarded_update(accelerator, sit_loss, sit.parameters(), optimizer, guard,
                                       "SiT loss/gradient", max_grad_norm)
    return {"sit_loss": sit_loss, "denoising_loss": sit_outputs["denoising_loss"].mean(),
            "proj_loss": sit_outputs["proj_loss"].mean(), "grad_norm_sit": grad_norm_sit}


def main(args):
    """Train a SiT with REPA on cached latents."""
    configure_torch(allow_tf32=args.allow_tf32, compile=args.compile)
    accelerator = make_accelerator(mixed_precision=args.mixed_precision,
                                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                                   report_to=args.report_to, output_dir=args.output_dir, logging_dir=args.logging_dir)
    device = accelerator.device
    exp_dir = Path(args.output_dir) / args.exp_name
    resume_path = on_main_process(lambda: find_resume_checkpoint(
        exp_dir, resume_step=args.resume_step, continue_train_exp_dir=args.continue_train_exp_dir,
        resume_latest=args.resume_latest))

    set_seed(args.seed)  # the same initial weights on every process
    encoders, encoder_types, _ = load_encoders(args.enc_type, device, args.resolution, ckpt=args.enc_ckpt,
                                               random_init=args.enc_random_init)
    vae, latents_stats = load_vae(args.vae, args.vae_ckpt)
    vae = vae.to(device).eval().requires_grad_(False)
    shape = latent_shape(vae, args.resolution)
    sit = build_sit(args.model, shape, encoders, num_classes=args.num_classes, cfg_prob=args.cfg_prob,
                    encoder_depth=args.encoder_depth, qk_norm=args.qk_norm, fused_attn=args.fused_attn).to(device)
    set_batchnorm_stats(sit.bn, latents_stats)
    ema = make_ema(sit)
    optimizer = torch.optim.AdamW(sit.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    dataset = ImageLatentDataset(args.data_dir, args.vae_latents_name)
    dataloader, sampler = make_dataloader(dataset, global_batch_size=args.batch_size, accelerator=accelerator,
                                          seed=args.seed, num_workers=args.num_workers)
    if args.compile:
        (sit,) = compile_modules(sit)
    sit, optimizer = accelerator.prepare(sit, optimizer)

    run = TrainingRun(accelerator, exp_dir, config=args, project="REPA-E", local_batch_size=dataloader.batch_size,
                      max_train_steps=args.max_train_steps, max_nonfinite_steps=args.max_nonfinite_steps)
    run.logger.info(f"SiT parameters: {sum(p.numel() for p in sit.parameters()):,}; {len(dataset):,} images with "
                    f"latents {args.vae_latents_name} in {args.data_dir}")
    modules, optimizers = {"model": unwrap(sit), "ema": ema}, {"opt": optimizer}
    set_seed(args.seed + accelerator.process_index)  # each process its own random stream
    if resume_path is not None:
        run.resume(resume_path, modules, optimizers, batches_per_epoch=len(dataloader), seed=args.seed,
                   gradient_accumulation_steps=args.gradient_accumulation_steps)

    loss_kwargs = dict(path_type=args.path_type, prediction=args.prediction, weighting=args.weighting)
    for raw_image, moments, labels in run.batches(dataloader, sampler, args.epochs):
        logs = ldm_step(sit, optimizer, encoders, encoder_types, raw_image.to(device), moments.to(device),
                        labels.to(device), accelerator, run.guard, loss_kwargs=loss_kwargs,
                        proj_coeff=args.proj_coeff, max_grad_norm=args.max_grad_norm)
        if not accelerator.sync_gradients:
            continue  # accumulating: no optimization step yet
        update_ema(ema, unwrap(sit), args.ema_decay)
        run.end_step()

        if run.step % args.log_every == 0:
            run.log(logs)
        if run.step % args.checkpointing_steps == 0 or run.step == args.max_train_steps:
            run.save_checkpoint(modules, optimizers, keep_last=args.keep_last_checkpoints)
        if run.step == 1 or run.step % args.sampling_steps == 0:
            run.save_samples(sample_grid(ema, vae, accelerator, latent_shape=shape, num_images=args.sample_batch_size,
                                         seed=args.seed, path_type=args.path_type))
    run.finish()
    return run


def parse_args(input_args=None):
    """Published train_ldm_only.py flags."""
    parser = argparse.ArgumentParser(description="SiT + REPA training on cached VAE latents")
    add_training_args(parser, model_default="SiT-XL/1", vae_default="f16d32",
                      vae_ckpt_default="pretrained/e2e-vavae-400k/e2e-vavae-400k.pt")
    parser.add_argument("--vae-latents-name", type=str, default="e2e-vavae-400k")
    parser.add_argument("--cfg-prob", type=float, default=0.1)
    return validate_training_args(parser.parse_args(input_args))


if __name__ == "__main__":
    main(parse_args())
