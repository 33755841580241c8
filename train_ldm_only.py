"""Latent diffusion only: a SiT with REPA on latents cached from a frozen (E2E-)VAE.

One step (`ldm_step`) on a batch of uint8 images, cached posterior moments and labels: frozen-encoder features of
the images, one posterior sample z = mean + std * eps, then a SiT update on z: v-prediction loss + proj_coeff * REPA
loss. The batch-norm latent normalizer is fixed at the VAE's latent statistics (eval mode); the VAE itself only
decodes the sample grids. Then the EMA of the SiT.

    python cache_latents.py --vae-arch f16d32 --vae-ckpt-path pretrained/e2e-vavae/e2e-vavae.pt \
        --vae-latents-name e2e-vavae
    accelerate launch train_ldm_only.py --exp-name sit-xl-1-e2e-vavae --model SiT-XL/1 --vae f16d32 \
        --vae-ckpt pretrained/e2e-vavae/e2e-vavae.pt --vae-latents-name e2e-vavae

Heavy libraries are imported inside the functions that use them, so that --help answers at once.
"""
from training.flags import generation_eval_settings, training_parser
from utils.errors import UserError, report_user_errors


def build_parser():
    """Published train_ldm_only.py flags."""
    parser = training_parser("SiT + REPA training on latents cached from a frozen VAE", trainer="train_ldm_only.py",
                             model_default="SiT-XL/1",
                             vae_default="f16d32", vae_ckpt_default="pretrained/e2e-vavae-400k/e2e-vavae-400k.pt")
    ldm = parser.add_argument_group("latent diffusion")
    ldm.add_argument("--vae-latents-name", type=str, default="e2e-vavae-400k",
                     help="cached latents DATA_DIR/NAME.h5 written by cache_latents.py")
    return parser


def sample_posterior(moments):
    """One draw z = mean + std * eps from cached posterior moments (B, 2C, h, w): mean then std."""
    import torch

    mean, std = moments.chunk(2, dim=1)
    return mean + std * torch.randn_like(mean)


def ldm_step(nets, raw_image, moments, labels, accelerator, guard, *, loss_kwargs, proj_coeff, max_grad_norm,
             ema_decay):
    """One latent-diffusion step (module docstring); returns the step's metrics (tensors)."""
    from training.ema import update_ema
    from training.step import guarded_update, unwrap

    zs = nets.encoders.features(raw_image, accelerator)
    sit = nets.sit
    sit.train()
    unwrap(sit).bn.eval()  # the normalizer keeps the VAE's statistics
    with accelerator.accumulate(sit), accelerator.autocast():
        sit_outputs = sit(x=sample_posterior(moments), y=labels, zs=zs, loss_kwargs=loss_kwargs)
        sit_loss = sit_outputs["denoising_loss"].mean() + proj_coeff * sit_outputs["proj_loss"].mean()
        grad_norm_sit = guarded_update(accelerator, sit_loss, sit.parameters(), nets.opt_sit, guard,
                                       "SiT loss/gradient", max_grad_norm)
    if accelerator.sync_gradients:  # an optimization step ended
        update_ema(nets.ema, unwrap(sit), ema_decay)
    return {"sit_loss": sit_loss, "denoising_loss": sit_outputs["denoising_loss"].mean(),
            "proj_loss": sit_outputs["proj_loss"].mean(), "grad_norm_sit": grad_norm_sit}


def build(args, accelerator, dataset):
    """Frozen encoders and VAE, SiT (normalizer fixed at the VAE's statistics), EMA and optimizer, prepared; and
    the data loader. Returns (nets, vae, its latent statistics, latent shape, loader, sampler)."""
    import torch

    from models.autoencoder import latent_shape
    from models.sit import build_sit
    from training.ema import make_ema
    from training.nets import FrozenEncoders, SiTNets
    from training.setup import make_dataloader
    from training.step import compile_modules, make_adamw
    from weights.encoders import load_encoders
    from weights.latent_stats import set_batchnorm_stats
    from weights.vae import load_vae

    device = accelerator.device
    encoders = FrozenEncoders(*load_encoders(args.enc_type, device, args.resolution, ckpt=args.enc_ckpt,
                                             random_init=args.enc_random_init,
                                             allow_torchscript=args.enc_allow_torchscript)[:2])
    vae, latents_stats = load_vae(args.vae, args.vae_ckpt)
    vae = vae.to(device).eval().requires_grad_(False)
    shape = latent_shape(vae, args.resolution)
    cached = dataset.latent_shape  # posterior mean and std
    if cached != (2 * shape[0], *shape[1:]):
        raise UserError(f"--vae-latents-name {args.vae_latents_name}: the latents cached in {args.data_dir} are "
                        f"{cached[0] // 2}x{cached[1]}x{cached[2]}, but --vae {args.vae} --vae-ckpt {args.vae_ckpt} "
                        f"makes {'x'.join(map(str, shape))} latents: cache them with this VAE (cache_latents.py) or "
                        "pass the VAE they were cached with")
    sit = build_sit(args.model, shape, encoders.embed_dims, num_classes=args.num_classes,
                    cfg_prob=args.cfg_prob, encoder_depth=args.encoder_depth, qk_norm=args.qk_norm,
                    fused_attn=args.fused_attn).to(device)
    sit.set_grad_checkpointing(args.grad_checkpointing)
    set_batchnorm_stats(sit.bn, latents_stats)
    ema = make_ema(sit)
    optimizer = make_adamw(sit.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    dataloader, sampler = make_dataloader(dataset, global_batch_size=args.batch_size, accelerator=accelerator,
                                          seed=args.seed, num_workers=args.num_workers)
    if args.compile:
        (sit,) = compile_modules(sit)
    sit, optimizer = accelerator.prepare(sit, optimizer)
    latents_stats = {key: value.to(device, torch.float32) for key, value in latents_stats.items()}
    return SiTNets(encoders, sit, ema, optimizer), vae, latents_stats, shape, dataloader, sampler


def main(argv=None):
    """Train a SiT with REPA on cached latents. Every input is checked before anything is built or written."""
    args = build_parser().parse_args(argv)
    from accelerate.utils import set_seed

    from dataset.h5 import ImageLatentDataset
    from training.evaluator import GenerationEvaluator, evaluate_run
    from training.run import TrainingRun
    from training.sample_grid import sample_grid
    from training.setup import check_dataset, start_run
    from training.step import unwrap

    accelerator, exp_dir, resume_path = start_run(args)
    device = accelerator.device
    dataset = ImageLatentDataset(args.data_dir, args.vae_latents_name)
    check_dataset(dataset, resolution=args.resolution, global_batch_size=args.batch_size,
                  num_processes=accelerator.num_processes, num_classes=args.num_classes)

    set_seed(args.seed)  # the same initial weights on every process
    nets, vae, latents_stats, shape, dataloader, sampler = build(args, accelerator, dataset)
    run = TrainingRun(accelerator, exp_dir, config=args, local_batch_size=dataloader.batch_size,
                      max_train_steps=args.max_train_steps, max_nonfinite_steps=args.max_nonfinite_steps,
                      modules={"model": unwrap(nets.sit), "ema": nets.ema}, optimizers={"opt": nets.opt_sit},
                      keep_last_checkpoints=args.keep_last_checkpoints)
    generation = None
    if args.eval_every:  # reference, weights and networks of the evaluation checked before anything is written
        generation = GenerationEvaluator(accelerator, **generation_eval_settings(args))
    set_seed(args.seed + accelerator.process_index)  # each process its own random stream
    if resume_path is not None:  # a checkpoint that does not fit these networks stops the run here
        run.resume(resume_path, batches_per_epoch=len(dataloader), seed=args.seed,
                   gradient_accumulation_steps=args.gradient_accumulation_steps)
    run.open(project="REPA-E")  # the first write: EXP, its args, log.txt, trackers
    run.logger.info(f"SiT parameters: {sum(p.numel() for p in nets.sit.parameters()):,}; {len(dataset):,} images "
                    f"with latents {args.vae_latents_name} in {args.data_dir}")

    for note in generation.notes if generation else []:
        run.logger.warning(note)

    def evaluate():  # the VAE file's statistics decode the samples, as generate.py decodes them
        evaluate_run(run, generation=generation, reconstruction=None, ema=nets.ema, vae=vae, stats=latents_stats,
                     latent_shape=shape, path_type=args.path_type)

    loss_kwargs = dict(path_type=args.path_type, prediction=args.prediction, weighting=args.weighting)
    for raw_image, moments, labels in run.batches(dataloader, sampler, args.epochs):
        logs = ldm_step(nets, raw_image.to(device), moments.to(device), labels.to(device), accelerator,
                        run.guard, loss_kwargs=loss_kwargs, proj_coeff=args.proj_coeff,
                        max_grad_norm=args.max_grad_norm, ema_decay=args.ema_decay)
        if not run.end_step(logs, log_every=args.log_every, checkpoint_every=args.checkpointing_steps):
            continue  # accumulating: no optimization step yet
        if run.step == 1 or run.step % args.sampling_steps == 0:
            run.save_samples(sample_grid(nets.ema, vae, accelerator, latent_shape=shape,
                                         num_images=args.sample_batch_size, seed=args.seed, path_type=args.path_type))
        if run.evaluation_due(args.eval_every):
            evaluate()
    if run.reached_end and run.evaluation_due(args.eval_every, at_end=True):
        evaluate()
    run.finish()  # the last step is always checkpointed
    return run


if __name__ == "__main__":
    report_user_errors(main)()
