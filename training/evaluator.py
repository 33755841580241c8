"""Evaluation during training: the paper's numbers at a cadence, on the code generate.py and evaluate.py run.

GenerationEvaluator samples K images from the EMA SiT through the current VAE with generate.py's random stream on
one process (`generate.py --num-fid-samples K --pproc-batch-size B --global-seed SEED`), the batches dealt out to
the training processes; each process computes the features of its batches (evaluation.features), process 0
gathers them and scores them with evaluate.py's formulas: the same numbers on any number of processes, and those
evaluate.py gives for that generate.py .npz (to float rounding: evaluate.py batches the features its own way).
ReconstructionEvaluator reports the current VAE's PSNR, SSIM, LPIPS and rFID on K fixed training images, as
eval_vae.py computes them.
"""
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from evaluation.features import FeatureExtractor, choose_metrics, compute_metrics, full_float32
from evaluation.metrics import fid_statistics, frechet_distance
from evaluation.reconstruction import evaluate_vae, original_features
from evaluation.reference import ReferenceStatistics, check_reference
from loss.lpips import build_lpips
from sampling.generation import num_batches, process_seed, sample_batches
from training.flags import TRAINING_METRICS
from training.step import unwrap
from weights.latent_stats import latent_decoder, stats_from_batchnorm


def gather_to_main(accelerator, value):
    """[value of each process] on process 0, None elsewhere."""
    if accelerator.num_processes == 1:
        return [value]
    gathered = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


class GenerationEvaluator:
    """IS, FID, sFID and FD-DINOv2 of K samples of the EMA SiT against a reference (evaluation.reference)."""

    def __init__(self, accelerator, *, reference, resolution, num_samples, batch_size, seed, sampler, num_steps,
                 cfg_scale, metrics, inception_weights, inception_random_init, dinov2_weights, dinov2_random_init):
        """Load and check the reference and build the feature networks (UserError for a reference of another
        resolution or feature network, or missing weights); nothing is written. `notes` says what is left out
        and when K samples give a singular covariance."""
        self.accelerator = accelerator
        self.reference = ReferenceStatistics.load(reference)
        self.metrics, notes = choose_metrics(metrics, self.reference, offered=TRAINING_METRICS,
                                             dinov2_given=bool(dinov2_weights or dinov2_random_init))
        self.extractor = FeatureExtractor(self.metrics, accelerator.device, inception_weights, inception_random_init,
                                          dinov2_weights, dinov2_random_init)
        check_reference(self.reference, resolution, self.extractor)
        if accelerator.is_main_process:
            self.reference.prepare(self.extractor, batch_size)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.sampling = dict(seed=process_seed(seed, 0, 1), num_batches=num_batches(num_samples, batch_size),
                             batch_size=batch_size, mode=sampler, num_steps=num_steps, heun=False, cfg_scale=cfg_scale,
                             guidance_low=0.0, guidance_high=1.0)
        self.notes = [*notes, *(f"--eval-num-samples {num_samples}: {warning}"
                                for warning in self.extractor.covariance_warnings(num_samples))]

    def __call__(self, ema, vae, stats, latent_shape, path_type):
        """{metric: number, "samples": K} of the EMA SiT's samples decoded by vae with latent statistics `stats`, on
        process 0 (None elsewhere). Process r samples and featurizes batches r, r + P, ...; the others are drawn
        with a zero-velocity model, so each batch is the one a single generate.py process makes."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        decode = latent_decoder(vae, stats)
        features = {}
        with full_float32(self.accelerator.device.type):
            for batch, images in sample_batches(ema, decode, latent_shape, path_type=path_type,
                                                skip=lambda batch: batch % world != rank, **self.sampling):
                features[batch] = self.extractor(images)
        gathered = gather_to_main(self.accelerator, features)
        if gathered is None:
            return None
        ordered = [part[batch] for batch in range(self.sampling["num_batches"]) for part in gathered if batch in part]
        samples = {name: np.concatenate([part[name] for part in ordered])[:self.num_samples]
                   for name in ordered[0]}
        return {**compute_metrics(samples, self.reference, self.metrics, self.accelerator.device),
                "samples": self.num_samples}


class ReconstructionEvaluator:
    """PSNR, SSIM, LPIPS and rFID of the current VAE on K fixed training images (the dataset's first), on process 0,
    as eval_vae.py computes them; rFID needs Inception weights (or random ones, a smoke figure)."""

    def __init__(self, accelerator, dataset, *, num_images, batch_size, lpips_random_init, extractor,
                 inception_weights, inception_random_init):
        """Build LPIPS and the originals' Inception statistics, on process 0; Inception is the extractor's (the
        GenerationEvaluator's) when it has one, else built from the weights flags."""
        self.accelerator = accelerator
        if not accelerator.is_main_process:
            return
        device = accelerator.device
        count = min(num_images, len(dataset))
        self.loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size)
        self.lpips = build_lpips(pretrained_trunk=not lpips_random_init).to(device)
        self.inception = extractor.networks.get("inception") or FeatureExtractor(
            ["fid"], device, inception_weights, inception_random_init).networks["inception"]
        with full_float32(device.type):
            self.reference = fid_statistics(original_features(self.inception, self.loader))

    def __call__(self, vae):
        """{recon_psnr, recon_ssim, recon_lpips, recon_rfid, recon_images} of an eval-mode vae on process 0 (None
        elsewhere)."""
        if not self.accelerator.is_main_process:
            return None
        with full_float32(self.accelerator.device.type):
            metrics, pool = evaluate_vae(vae, self.loader, self.accelerator.device, self.lpips, self.inception)
        return {"recon_psnr": metrics["psnr"], "recon_ssim": metrics["ssim"], "recon_lpips": metrics["lpips"],
                "recon_rfid": frechet_distance(*fid_statistics(pool), *self.reference),
                "recon_images": len(self.loader.dataset)}


def evaluate_run(run, *, generation, reconstruction, ema, vae, stats, latent_shape, path_type):
    """Evaluate at run.step (the samples, and the reconstructions when a ReconstructionEvaluator is given) with the
    VAE in eval mode, then record the numbers with run.log_evaluation. stats None: the latent statistics of the EMA
    SiT's batch-norm, as generate.py decodes a REPA-E checkpoint's samples."""
    started = time.time()
    stats = batchnorm_stats(ema) if stats is None else stats
    vae = unwrap(vae)
    was_training = vae.training
    vae.eval()
    devices = [run.accelerator.device] if run.accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the sampler seeds torch: training's random streams go on as before
        results = generation(ema, vae, stats, latent_shape, path_type) or {}
        if reconstruction is not None:
            results.update(reconstruction(vae) or {})
    vae.train(was_training)
    run.log_evaluation(results, seconds=time.time() - started)


def batchnorm_stats(ema):
    """The latent statistics the EMA SiT's batch-norm holds."""
    bn = ema.bn
    return {key: value.to(bn.running_mean.device)
            for key, value in stats_from_batchnorm(bn.running_mean, bn.running_var).items()}

