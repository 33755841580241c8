"""REPA-E: end-to-end training of a SiT together with its VAE.

One step (`repae_step`) on a batch of uint8 images and labels:
  1. frozen-encoder features (patch tokens) of the images;
  2. VAE forward: posterior, one posterior sample z, reconstruction;
  3. VAE update: regularizer (L1 + LPIPS + KL + PatchGAN) + vae_align_proj_coeff * REPA alignment of the SiT's
     features at block encoder_depth on z, through the frozen SiT in eval mode (batch-norm running statistics);
  4. discriminator update on the real images and the detached reconstructions;
  5. SiT update on z.detach() (stop-gradient: the diffusion loss never reaches the VAE) with the time and noise of
     step 3, batch-norm in training mode: v-prediction loss + proj_coeff * REPA loss;
  6. EMA of the SiT.

    accelerate launch train_repae.py --exp-name repae-sit-xl-2 --model SiT-XL/2 --vae f8d4 \
        --vae-ckpt pretrained/sdvae/sdvae-f8d4.pt --enc-type dinov2-vit-b --batch-size 256

Heavy libraries are imported inside the functions that use them, so that --help answers at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.flags import generation_eval_settings, training_parser
from training.nets import SiTNets
from utils.cli import non_negative_float, positive_float, repository_file, unit_float
from utils.errors import report_user_errors

if TYPE_CHECKING:
    import torch


@dataclass
class Nets(SiTNets):
    """What a REPA-E step trains and uses, as accelerate prepared it: the SiT side, and the VAE, its regularizer
    (which owns the discriminator) and their optimizers."""
    vae: torch.nn.Module
    vae_loss_fn: torch.nn.Module
    opt_vae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer


def build_parser():
    """Published train_repae.py flags, plus smoke-run and ablation switches."""
    parser = training_parser("REPA-E end-to-end training of a SiT and its VAE", trainer="train_repae.py",
                             model_default="SiT-XL/2",
                             vae_default="f8d4", vae_ckpt_default="pretrained/sdvae-f8d4/sdvae-f8d4.pt")
    repae = parser.add_argument_group("end-to-end training")
    repae.add_argument("--bn-momentum", type=unit_float, default=0.1,
                       help="momentum of the SiT's batch-norm normalizer")
    repae.add_argument("--disc-pretrained-ckpt", type=str, default=None,
                       help="discriminator weights: a path or a hub id (REPA-E/sdvae means its discriminator file)")
    repae.add_argument("--loss-cfg-path", type=str, default="configs/l1_lpips_kl_gan.yaml",
                       help="VAE regularizer config (relative paths also resolve against the repository)")
    repae.add_argument("--vae-learning-rate", type=positive_float, default=1e-4, help="VAE AdamW learning rate")
    repae.add_argument("--disc-learning-rate", type=positive_float, default=1e-4,
                       help="discriminator AdamW learning rate")
    repae.add_argument("--vae-align-proj-coeff", type=non_negative_float, default=1.5,
                       help="weight of the REPA loss in the VAE update")
    repae.add_argument("--lpips-random-init", action="store_true",
                       help="random LPIPS VGG trunk when its weights are not available offline (smoke runs)")
    repae.add_argument("--diffusion-loss-to-vae", action="store_true",
                       help="ablation: no stop-gradient, the diffusion loss also trains the VAE")
    repae.add_argument("--freeze-vae", action="store_true",
                       help="ablation: keep the VAE fixed (the REPA baseline with a batch-norm normalizer)")
    repae.add_argument("--log-latent-stats", action="store_true",
                       help="log per-channel mean and std of the latents (watch for latent collapse)")
    return parser


def parse_args(input_args=None):
    """The run's flags; exclusive ablations are refused here."""
    parser = build_parser()
    args = parser.parse_args(input_args)
    if args.freeze_vae and args.diffusion_loss_to_vae:
        parser.error("--freeze-vae and --diffusion-loss-to-vae exclude each other")
    return args


def latent_channel_stats(z):
    """Per-channel mean and std of a latent batch, the signal of the latent collapse the paper describes."""
    from weights.latent_stats import LatentMoments

    mean, std = (value.float() for value in LatentMoments().update(z).mean_std())
    logs = {f"latent_mean/c{i}": m for i, m in enumerate(mean)}
    logs.update({f"latent_std/c{i}": s for i, s in enumerate(std)})
    logs["latent_std_min"] = std.min()
    return logs


def loss_buffers(vae_loss_fn):
    """Buffers the loss function owns itself (LeCam EMAs), not those of its discriminator or LPIPS net."""
    return dict(vae_loss_fn.named_buffers(recurse=False))


def repae_step(nets, raw_image, labels, step, accelerator, guard, *, loss_kwargs, proj_coeff,
               vae_align_proj_coeff, max_grad_norm, ema_decay, freeze_vae=False, diffusion_loss_to_vae=False,
               log_latent_stats=False):
    """One REPA-E step (module docstring) on uint8 images and labels; returns the step's metrics (tensors).

    Its parts are labelled `repae/...` for torch.profiler (bench/bench_step.py times them so)."""
    import torch
    from torch.profiler import record_function

    from models.autoencoder import preprocess_imgs_vae
    from training.ema import requires_grad, update_ema
    from training.step import guarded_update, unwrap

    with record_function("repae/encoder_features"):
        zs = nets.encoders.features(raw_image, accelerator)
    sit, vae = nets.sit, nets.vae
    vae.train(not freeze_vae)
    logs = {}
    with accelerator.accumulate(sit, vae, nets.vae_loss_fn), accelerator.autocast():
        with record_function("repae/vae_forward"), torch.set_grad_enabled(not freeze_vae):
            processed_image = preprocess_imgs_vae(raw_image)
            posterior, z, recon_image = vae(processed_image)

        # VAE update through the frozen SiT; the parameters frozen here are exactly those trained in the SiT update.
        with record_function("repae/vae_update"):
            sit_trainable = [param for param in sit.parameters() if param.requires_grad]
            requires_grad(sit_trainable, False)
            sit.eval()
            vae_align = sit(x=z, y=labels, zs=zs, loss_kwargs=loss_kwargs, align_only=not diffusion_loss_to_vae)
            if not freeze_vae:
                vae_loss, vae_loss_dict = nets.vae_loss_fn(processed_image, recon_image, posterior, step, "generator")
                vae_loss = vae_loss.mean() + vae_align_proj_coeff * vae_align["proj_loss"].mean()
                if diffusion_loss_to_vae:
                    vae_loss = vae_loss + vae_align["denoising_loss"].mean()
                logs["grad_norm_vae"] = guarded_update(accelerator, vae_loss, vae.parameters(), nets.opt_vae, guard,
                                                       "VAE loss/gradient", max_grad_norm)
                logs.update(vae_loss=vae_loss, **{k: v.mean() for k, v in vae_loss_dict.items() if k != "total_loss"})

        # Discriminator update on real images and detached reconstructions.
        if not freeze_vae:
            with record_function("repae/discriminator_update"):
                d_loss, d_loss_dict = nets.vae_loss_fn(processed_image, recon_image, posterior, step, "discriminator")
                logs["grad_norm_disc"] = guarded_update(accelerator, d_loss, nets.vae_loss_fn.parameters(),
                                                        nets.opt_disc, guard, "discriminator loss/gradient",
                                                        max_grad_norm)
                logs.update(d_loss=d_loss, **{k: v.mean() for k, v in d_loss_dict.items() if k != "discriminator_loss"})

        # SiT update on the detached latent with the same time and noise.
        with record_function("repae/sit_update"):
            requires_grad(sit_trainable, True)
            sit.train()
            sit_outputs = sit(x=z.detach(), y=labels, zs=zs, loss_kwargs=loss_kwargs,
                              time_input=vae_align["time_input"], noises=vae_align["noises"])
            sit_loss = sit_outputs["denoising_loss"].mean() + proj_coeff * sit_outputs["proj_loss"].mean()
            logs["grad_norm_sit"] = guarded_update(accelerator, sit_loss, sit.parameters(), nets.opt_sit, guard,
                                                   "SiT loss/gradient", max_grad_norm)
    if accelerator.sync_gradients:  # an optimization step ended
        with record_function("repae/ema"):
            update_ema(nets.ema, unwrap(sit), ema_decay)
    logs.update(sit_loss=sit_loss, denoising_loss=sit_outputs["denoising_loss"].mean(),
                proj_loss=sit_outputs["proj_loss"].mean(), vae_align_loss=vae_align["proj_loss"].mean())
    if log_latent_stats:
        logs.update(latent_channel_stats(z))
    return logs


def build(args, accelerator, dataset, loss_config):
    """Frozen encoders, VAE, SiT (normalizer set), EMA, regularizer and optimizers, prepared; and the data loader."""
    import functools
    import warnings

    from loss.vae_loss import ReconstructionLoss_Single_Stage
    from models.autoencoder import latent_shape
    from models.sit import build_sit
    from training.ema import make_ema
    from training.nets import FrozenEncoders
    from training.setup import make_dataloader
    from training.step import compile_modules, make_adamw, sync_batchnorm
    from weights.checkpoint import load_file, load_state_dict_strict
    from weights.encoders import load_encoders
    from weights.hub import resolve_weights
    from weights.latent_stats import estimate_latents_stats, set_batchnorm_stats
    from weights.vae import load_vae

    device = accelerator.device
    encoders = FrozenEncoders(*load_encoders(args.enc_type, device, args.resolution, ckpt=args.enc_ckpt,
                                             random_init=args.enc_random_init,
                                             allow_torchscript=args.enc_allow_torchscript)[:2])
    vae, latents_stats = load_vae(args.vae, args.vae_ckpt, require_stats=False)
    vae = vae.to(device)
    sit = build_sit(args.model, latent_shape(vae, args.resolution), encoders.embed_dims,
                    num_classes=args.num_classes, cfg_prob=args.cfg_prob, encoder_depth=args.encoder_depth,
                    bn_momentum=args.bn_momentum, qk_norm=args.qk_norm, fused_attn=args.fused_attn).to(device)
    if args.grad_checkpointing:
        sit.set_grad_checkpointing()
        vae.set_grad_checkpointing()
    vae_loss_fn = ReconstructionLoss_Single_Stage(loss_config, pretrained_lpips=not args.lpips_random_init).to(device)
    if args.disc_pretrained_ckpt:
        disc_ckpt = resolve_weights(args.disc_pretrained_ckpt, kind="discriminator")
        load_state_dict_strict(vae_loss_fn.discriminator, load_file(disc_ckpt), f"--disc-pretrained-ckpt {disc_ckpt}")
    elif not (args.freeze_vae or vae_loss_fn.discriminator_warmup or vae_loss_fn.discriminator_start):
        warnings.warn("no --disc-pretrained-ckpt: a fresh run's discriminator starts from scratch and the loss config "
                      "lets its adversarial term reach the VAE from step 0; configs/l1_lpips_kl_gan_scratch_disc.yaml "
                      "trains it first")

    dataloader, sampler = make_dataloader(dataset, global_batch_size=args.batch_size, accelerator=accelerator,
                                          seed=args.seed, num_workers=args.num_workers)
    if latents_stats is None:
        warnings.warn("no latent statistics with the VAE (its files and config record none): estimated from the "
                      "first batches")
        first_batches = [images for images, _ in zip((batch[0] for batch in dataloader), range(4))]
        latents_stats = {k: accelerator.reduce(v, "mean")
                         for k, v in estimate_latents_stats(vae, first_batches, device).items()}
    set_batchnorm_stats(sit.bn, latents_stats)
    ema = make_ema(sit)

    sit = sync_batchnorm(sit, accelerator)
    adamw = functools.partial(make_adamw, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    opt_sit = adamw(sit.parameters(), lr=args.learning_rate)
    opt_vae = adamw(vae.parameters(), lr=args.vae_learning_rate)
    opt_disc = adamw(vae_loss_fn.parameters(), lr=args.disc_learning_rate)
    if args.compile:
        sit, vae, vae_loss_fn = compile_modules(sit, vae, vae_loss_fn)
    sit, vae, vae_loss_fn, opt_sit, opt_vae, opt_disc = accelerator.prepare(
        sit, vae, vae_loss_fn, opt_sit, opt_vae, opt_disc)
    nets = Nets(encoders=encoders, sit=sit, ema=ema, opt_sit=opt_sit, vae=vae, vae_loss_fn=vae_loss_fn,
                opt_vae=opt_vae, opt_disc=opt_disc)
    return nets, dataloader, sampler


def main(argv=None):
    """Train SiT and VAE end to end. Every input is checked before anything is built or written."""
    args = parse_args(argv)
    from accelerate.utils import set_seed

    from dataset.h5 import ImageDataset
    from models.autoencoder import latent_shape
    from training.evaluator import GenerationEvaluator, ReconstructionEvaluator, evaluate_run
    from training.run import TrainingRun
    from training.sample_grid import sample_grid
    from training.setup import check_dataset, load_loss_config, start_run
    from training.step import unwrap
    from weights.vae import vae_checkpoint_entries

    accelerator, exp_dir, resume_path = start_run(args)
    loss_config = load_loss_config(repository_file(args.loss_cfg_path, "--loss-cfg-path"), "--loss-cfg-path")
    dataset = ImageDataset(args.data_dir)
    check_dataset(dataset, resolution=args.resolution, global_batch_size=args.batch_size,
                  num_processes=accelerator.num_processes, num_classes=args.num_classes)

    set_seed(args.seed)  # the same initial weights on every process
    nets, dataloader, sampler = build(args, accelerator, dataset, loss_config)
    grid_latent_shape = latent_shape(unwrap(nets.vae), args.resolution)
    # Checkpoint keys of the published layout; the regularizer's own buffers (LeCam statistics) ride along.
    run = TrainingRun(accelerator, exp_dir, config=args, local_batch_size=dataloader.batch_size,
                      max_train_steps=args.max_train_steps, max_nonfinite_steps=args.max_nonfinite_steps,
                      modules={"model": unwrap(nets.sit), "ema": nets.ema, "vae": unwrap(nets.vae),
                               "discriminator": unwrap(nets.vae_loss_fn).discriminator},
                      optimizers={"opt": nets.opt_sit, "opt_vae": nets.opt_vae, "opt_disc": nets.opt_disc},
                      keep_last_checkpoints=args.keep_last_checkpoints,
                      checkpoint_extra={"vae_loss_buffers": loss_buffers(unwrap(nets.vae_loss_fn)),
                                        **vae_checkpoint_entries(args.vae, unwrap(nets.vae))})
    generation, reconstruction = None, None
    if args.eval_every:  # reference, weights and networks of the evaluation checked before anything is written
        generation = GenerationEvaluator(accelerator, **generation_eval_settings(args))
        reconstruction = ReconstructionEvaluator(
            accelerator, dataset, num_images=args.eval_num_samples, batch_size=args.eval_batch_size,
            lpips_random_init=args.lpips_random_init, extractor=generation.extractor,
            inception_weights=args.inception_weights, inception_random_init=args.inception_random_init)
    set_seed(args.seed + accelerator.process_index)  # each process its own random stream
    if resume_path is not None:  # a checkpoint that does not fit these networks stops the run here
        checkpoint = run.resume(resume_path, batches_per_epoch=len(dataloader), seed=args.seed,
                                gradient_accumulation_steps=args.gradient_accumulation_steps)
        for name, buffer in loss_buffers(unwrap(nets.vae_loss_fn)).items():
            buffer.copy_(checkpoint.get("vae_loss_buffers", {}).get(name, buffer))
    run.open(project="REPA-E")  # the first write: EXP, its args, log.txt, trackers
    run.logger.info(f"SiT parameters: {sum(p.numel() for p in nets.sit.parameters()):,}; "
                    f"VAE parameters: {sum(p.numel() for p in nets.vae.parameters()):,}; "
                    f"{len(dataset):,} images in {args.data_dir}")

    for note in generation.notes if generation else []:
        run.logger.warning(note)

    def evaluate():
        evaluate_run(run, generation=generation, reconstruction=reconstruction, ema=nets.ema, vae=nets.vae,
                     stats=None, latent_shape=grid_latent_shape, path_type=args.path_type)

    loss_kwargs = dict(path_type=args.path_type, prediction=args.prediction, weighting=args.weighting)
    for raw_image, labels in run.batches(dataloader, sampler, args.epochs):
        logs = repae_step(nets, raw_image.to(accelerator.device), labels.to(accelerator.device), run.step,
                          accelerator, run.guard, loss_kwargs=loss_kwargs, proj_coeff=args.proj_coeff,
                          vae_align_proj_coeff=args.vae_align_proj_coeff, max_grad_norm=args.max_grad_norm,
                          ema_decay=args.ema_decay, freeze_vae=args.freeze_vae,
                          diffusion_loss_to_vae=args.diffusion_loss_to_vae, log_latent_stats=args.log_latent_stats)
        if not run.end_step(logs, log_every=args.log_every, checkpoint_every=args.checkpointing_steps):
            continue  # accumulating: no optimization step yet
        if run.step == 1 or run.step % args.sampling_steps == 0:
            run.save_samples(sample_grid(nets.ema, unwrap(nets.vae), accelerator, latent_shape=grid_latent_shape,
                                         num_images=args.sample_batch_size, seed=args.seed,
                                         path_type=args.path_type))
        if run.evaluation_due(args.eval_every):
            evaluate()
    if run.reached_end and run.evaluation_due(args.eval_every, at_end=True):
        evaluate()
    run.finish()  # the last step is always checkpointed
    return run


if __name__ == "__main__":
    report_user_errors(main)()
