"""Latent diffusion only: a SiT with REPA on latents cached from a frozen (E2E-)VAE.

The batch-norm latent normalizer is fixed from the VAE's latent statistics and stays in eval mode; the VAE
itself is only used to decode the sample grids.

    python cache_latents.py --vae-arch f16d32 --vae-ckpt-path pretrained/e2e-vavae/e2e-vavae.pt \
        --vae-latents-name e2e-vavae
    accelerate launch train_ldm_only.py --exp-name sit-xl-1-e2e-vavae --model SiT-XL/1 --vae f16d32 \
        --vae-ckpt pretrained/e2e-vavae/e2e-vavae.pt --vae-latents-name e2e-vavae
"""
import argparse
import copy

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from utils.cli import add_training_args, validate_training_args
from utils.data import ImageLatentDataset
from utils.ema import requires_grad, update_ema
from utils.guard import NonFiniteGuard
from utils.latents import load_vae
from utils.training import (
    build_encoders_and_sit, compile_modules, encoder_features, finish_step, finish_training, guarded_update,
    make_accelerator, make_dataloader, make_optimizer, restore_training_state, setup_experiment, start_epoch,
    unwrap,
)


def sample_posterior(moments):
    """One draw z = mean + std * eps from cached posterior moments (B, 2C, h, w): mean then std."""
    mean, std = moments.chunk(2, dim=1)
    return mean + std * torch.randn_like(mean)


def main(args):
    """Train a SiT with REPA on cached latents."""
    accelerator = make_accelerator(args)
    exp_dir, logger, resume_path = setup_experiment(args, accelerator)
    device = accelerator.device

    set_seed(args.seed)
    encoders, encoder_types, model = build_encoders_and_sit(args, device)
    vae, latents_stats = load_vae(args.vae, args.vae_ckpt)
    vae = vae.to(device).eval()
    requires_grad(vae, False)
    model.init_bn(latents_stats["latents_scale"].to(device), latents_stats["latents_bias"].to(device))
    ema = copy.deepcopy(model).eval()
    requires_grad(ema, False)
    logger.info(f"SiT parameters: {sum(p.numel() for p in model.parameters()):,}")

    optimizer = make_optimizer(model.parameters(), args.learning_rate, args)
    dataset = ImageLatentDataset(args.data_dir, args.vae_latents_name)
    dataloader, sampler = make_dataloader(dataset, args, accelerator)
    logger.info(f"Dataset contains {len(dataset):,} images with latents {args.vae_latents_name} ({args.data_dir})")

    if args.compile:
        (model,) = compile_modules(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    modules = {"model": unwrap(model), "ema": ema}
    optimizers = {"opt": optimizer}
    guard = NonFiniteGuard(args.max_nonfinite_steps, logger)
    state = {"steps": 0, "epoch": 0, "batch_in_epoch": 0}
    set_seed(args.seed + accelerator.process_index)
    if resume_path is not None:
        state, _ = restore_training_state(resume_path, args, accelerator, modules, optimizers, guard,
                                          len(dataloader))
        logger.info(f"Resumed from {resume_path} at step {state['steps']}")
    global_step = state["steps"]

    accelerator.init_trackers("REPA-E", config=vars(copy.deepcopy(args)),
                              init_kwargs={"wandb": {"name": args.exp_name}})
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    loss_kwargs = dict(path_type=args.path_type, prediction=args.prediction, weighting=args.weighting)

    for epoch in range(state["epoch"], args.epochs):
        start_batch = start_epoch(sampler, dataloader, epoch, state)
        for batch_in_epoch, (raw_image, moments, labels) in enumerate(dataloader, start=start_batch):
            if global_step >= args.max_train_steps:
                break
            raw_image, moments, labels = raw_image.to(device), moments.to(device), labels.to(device)
            zs = encoder_features(encoders, encoder_types, raw_image, accelerator)
            # The normalizer keeps the VAE's statistics: eval mode while the rest of the SiT trains.
            model.train()
            unwrap(model).bn.eval()
            with accelerator.accumulate(model), accelerator.autocast():
                sit_outputs = model(x=sample_posterior(moments), y=labels, zs=zs, loss_kwargs=loss_kwargs)
                sit_loss = sit_outputs["denoising_loss"].mean() + args.proj_coeff * sit_outputs["proj_loss"].mean()
                grad_norm_sit = guarded_update(accelerator, sit_loss, model.parameters(), optimizer, guard,
                                               "SiT loss/gradient", args.max_grad_norm)

            if not accelerator.sync_gradients:
                continue
            update_ema(ema, unwrap(model), args.ema_decay)
            global_step += 1
            state = {"steps": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch + 1}
            logs = {"sit_loss": sit_loss, "denoising_loss": sit_outputs["denoising_loss"].mean(),
                    "proj_loss": sit_outputs["proj_loss"].mean(), "grad_norm_sit": grad_norm_sit}
            finish_step(global_step, logs, state, args=args, accelerator=accelerator, exp_dir=exp_dir, logger=logger,
                        progress_bar=progress_bar, modules=modules, optimizers=optimizers, guard=guard, vae=vae)
        if global_step >= args.max_train_steps:
            break

    finish_training(accelerator, logger, global_step, guard)
    return state


def parse_args(input_args=None):
    """Published train_ldm_only.py flags."""
    parser = argparse.ArgumentParser(description="SiT + REPA training on cached VAE latents")
    add_training_args(parser, model_default="SiT-XL/1", vae_default="f16d32",
                      vae_ckpt_default="pretrained/e2e-vavae-400k/e2e-vavae-400k.pt")
    parser.add_argument("--vae-latents-name", type=str, default="e2e-vavae-400k")
    parser.add_argument("--cfg-prob", type=float, default=0.1)
    parser.add_argument("--bn-momentum", type=float, default=0.1,
                        help="recorded for generate.py; the normalizer stays fixed at the VAE's statistics here")
    return validate_training_args(parser.parse_args(input_args))


if __name__ == "__main__":
    main(parse_args())
