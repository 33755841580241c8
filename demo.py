"""The whole REPA-E pipeline on a tiny setting that runs on a CPU in minutes, without downloads.

Data: crops of eight colour photographs that ship with scikit-image, one class per photograph, at 32x32 pixels.
No pretrained weights are available offline, so the VAE starts from random weights and the DINOv2 encoder and
the LPIPS VGG trunk are randomly initialised. Each stage runs the real script:

    preprocessing.py -> train_repae.py -> save_vae_weights.py (+ diffusers export) -> cache_latents.py
    -> train_ldm_only.py -> generate.py (torchrun, 2 processes) -> NAME.npz
    -> evaluate.py, eval_vae.py, visualize_latents.py on those outputs

At the end the demo checks that it learned: it samples every class from the final LDM-only EMA weights and
counts the classes whose samples are mostly closest (in pixels, averaged over 4x4 blocks) to a training image
of their own class. The full setting reaches at least 6 of 8; below that the demo ends with exit status 1.
Every run starts from scratch: a rerun replaces the output folder (only ever a folder demo.py made).

    python demo.py                 # about ten minutes on 2 idle cores, plus two FID evaluations (README)
    python demo.py --quick         # a short pass (the tests): fewer images and steps, generate.py on one process,
                                   # no evaluate.py, eval_vae.py or visualize_latents.py
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel")
MARKER = ".repae-demo"  # marks a folder demo.py made, so that only such a folder is ever replaced
SETTINGS = {
    "full": dict(crops=12, repae_steps=150, ldm_steps=800, samples=32, sampling_steps=50, log_every=10, eval_every=400,
                 generate_processes=2),
    "quick": dict(crops=4, repae_steps=6, ldm_steps=6, samples=8, sampling_steps=4, log_every=1, eval_every=6,
                  generate_processes=1),
}
RESOLUTION = 32
BATCH = 16
CFG_SCALE = 4.0  # the strength of the training sample grids: with eight classes, samples clearly of their class
PASS_MARK = 6  # classes of 8 the full setting must get right
SAMPLES_PER_CLASS = 5  # odd: a class passes when most of its samples are nearest to its own training images
BLOCK = 4  # pixels averaged per side before the nearest-neighbour search: a blur-tolerant colour layout


def make_photo_tree(folder, crops_per_photo, seed=0):
    """Random square crops (and flips) of the scikit-image photographs, one class folder per photograph."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for label, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()[..., :3]
        class_dir = Path(folder) / f"{label:02d}_{name}"
        class_dir.mkdir(parents=True, exist_ok=True)
        height, width = photo.shape[:2]
        for i in range(crops_per_photo):
            side = int(min(height, width) * rng.uniform(0.6, 1.0))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = photo[top:top + side, left:left + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(class_dir / f"{i:03d}.png")
    return Path(folder)


def run(step, *args, nproc=1, one_thread=True):
    """Run one pipeline stage as its real command line, echoing it; stop the demo if it fails."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, *map(str, args)]
    print(f"\n=== {step}\n$ {' '.join(command)}", flush=True)
    started = time.time()
    # one thread for the tiny models: they gain little from two, and lose much when the cores are busy
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if one_thread else None
    result = subprocess.run(command, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"demo stopped: {step} failed with exit code {result.returncode}")
    print(f"=== {step}: done in {time.time() - started:.0f} s", flush=True)


def last_losses(log_file):
    """The loss line of the last step logged in an experiment's log.txt."""
    found = re.findall(r"step \d+: .*", Path(log_file).read_text())
    return found[-1] if found else "(no losses logged)"


def training_images(data_dir):
    """All images of DATA/images.h5 as uint8 (N, H, W, 3) and their labels."""
    from dataset.h5 import ImageDataset

    dataset = ImageDataset(str(data_dir))
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images).permute(0, 2, 3, 1).numpy(), np.array([int(label) for label in labels])


def write_reference_npz(data_dir, path):
    """The training images as an ADM-style reference batch (arr_0 uint8 NHWC), the reference of the evaluation
    during training and of evaluate.py."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=training_images(data_dir)[0])
    return path


@torch.no_grad()
def sample_each_class(exp_dir, step, per_class, num_steps):
    """uint8 EMA samples of every class (per_class each, fixed noise) and their labels, with generate.py's loaders."""
    from models.autoencoder import to_uint8_hwc
    from sampling.samplers import euler_sampler
    from weights.checkpoint import checkpoint_file
    from weights.latent_stats import denormalize_latents
    from weights.training_checkpoint import load_for_sampling

    model, vae, stats, shape = load_for_sampling(checkpoint_file(exp_dir, step), exp_path=exp_dir, vae_ckpt=None,
                                                    device="cpu")
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), *shape, generator=torch.Generator().manual_seed(0))
    latents = euler_sampler(model, noise, labels, num_steps=num_steps, cfg_scale=CFG_SCALE)
    images = vae.decode(denormalize_latents(latents.float(), stats))
    return to_uint8_hwc(images), labels.numpy()


def colour_layout(images):
    """uint8 (N, H, W, 3) -> float vectors of the pixels averaged over BLOCK x BLOCK squares."""
    n, height, width, _ = images.shape
    blocks = images.reshape(n, height // BLOCK, BLOCK, width // BLOCK, BLOCK, 3).astype(np.float32)
    return blocks.mean(axis=(2, 4)).reshape(n, -1)


def nearest_training_images(samples, train_images):
    """Index of each sample's nearest training image in colour layout (Euclidean)."""
    distances = ((colour_layout(samples)[:, None] - colour_layout(train_images)[None]) ** 2).sum(-1)
    return distances.argmin(axis=1)


def classes_recognised(labels, nearest_labels):
    """Per class: is the nearest training image of most of its samples from that class?"""
    return {int(c): bool((nearest_labels[labels == c] == c).mean() > 0.5) for c in np.unique(labels)}


def save_check_picture(samples, nearest, path):
    """One row per class: its samples, then the nearest training image of each."""
    rows = [np.concatenate([*row_samples, *row_nearest], axis=1)
            for row_samples, row_nearest in zip(np.split(samples, len(PHOTOS)), np.split(nearest, len(PHOTOS)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def nearest_neighbour_check(exp_dir, step, data_dir, num_steps, picture):
    """Sample every class, find each sample's nearest training image; returns {class: recognised}."""
    samples, labels = sample_each_class(exp_dir, step, SAMPLES_PER_CLASS, num_steps)
    train_images, train_labels = training_images(data_dir)
    nearest = nearest_training_images(samples, train_images)
    save_check_picture(samples, train_images[nearest], picture)
    return classes_recognised(labels, train_labels[nearest])


def inception_flags():
    """[] when the Inception weights are on this machine, else random weights (numbers only a smoke test)."""
    from evaluation.inception import inception_weights_path

    try:
        inception_weights_path()
        return []
    except FileNotFoundError:
        return ["--inception-random-init"]


def fid_column(eval_file):
    """The FID train_ldm_only.py logged at each evaluation, as a column of text (a smoke figure with random
    Inception weights)."""
    records = [json.loads(line) for line in Path(eval_file).read_text().splitlines()]
    smoke = " (random Inception weights: a smoke figure)" if inception_flags() else ""
    return "\n".join([f"  FID of the LDM-only samples during training{smoke}:"] +
                      [f"    step {record['step']:>4}: {record['fid']:.2f}" for record in records])


def evaluate_outputs(out, npz, vae_ckpt):
    """evaluate.py, eval_vae.py and visualize_latents.py on the outputs; returns their files."""
    folder, data, one_per_class = out / "evaluation", out / "data", out / "data_one_per_class"
    written = {}
    inception = inception_flags()
    if inception:
        print("\nNo Inception weights on this machine: evaluate.py runs with random ones, so IS, FID, sFID, "
              "precision and recall are only a smoke test.")
    written["evaluate.py numbers (.json)"] = folder / "samples_vs_training.json"
    # Inception gains from every core, unlike the tiny training models
    run("evaluate (the generated samples vs the training images)", "evaluate.py",
        folder / "training_images.npz", npz, "--device", "cpu",
        "--json", written["evaluate.py numbers (.json)"], *inception, one_thread=False)

    # a random VAE of the same layout: what end-to-end training started from (up to its seed)
    written["eval_vae.py table (.json)"] = folder / "vae.json"
    run("eval_vae (a random VAE vs the E2E-VAE)", "eval_vae.py", "--vae", "f8d4-tiny", "--vae-ckpt", "none",
        vae_ckpt, "--data-dir", data, "--device", "cpu", "--num-workers", 0, "--no-rfid", "--lpips-random-init",
        "--json", written["eval_vae.py table (.json)"], one_thread=False)

    # one row per class in the picture: images.h5 holds each class's crops in one block
    make_photo_tree(out / "photos_one_per_class", 1)
    run("preprocessing (one image per class, for the latent picture)", "preprocessing.py", "--imagenet-path",
        out / "photos_one_per_class", "--output-path", one_per_class, "--resolution", RESOLUTION)
    written["visualize_latents.py picture"] = folder / "latents_pca.png"
    run("visualize_latents (PCA of the latents)", "visualize_latents.py", "--vae", "f8d4-tiny", "--vae-ckpt",
        "none", vae_ckpt, "--data-dir", one_per_class, "--device", "cpu", "--num-images", len(PHOTOS),
        "--output", written["visualize_latents.py picture"], one_thread=False)
    return written


def print_what_to_see(outputs, cfg):
    """What each picture shows when the demo learned (all images are 32x32 pixels)."""
    repae, ldm = f"{cfg['repae_steps']:07d}.png", f"{cfg['ldm_steps']:07d}.png"
    learned = ("shows blurred\n    but recognisable photographs: the astronaut's orange suit, the brown cat, the cup "
               "on its red saucer, the\n    dark blue sky of the rocket, the black Hubble field, the beige tissue, the "
               "red retina, the rainbow wheel\n    (a small coloured spot in the middle of many is an artefact of the "
               "young VAE).")
    trained = learned if cfg["ldm_steps"] >= SETTINGS["full"]["ldm_steps"] else (
        f"after only {cfg['ldm_steps']} steps (--quick) still shows\n    coloured noise: the run checks that every "
        "stage works, not that it learns (the full demo shows the photographs).")
    print(f"""
What each picture should show (the classes, in order: {', '.join(PHOTOS)}):
  {outputs['REPA-E sample grids']}: 16 EMA samples of random classes (CFG {CFG_SCALE}); 0000001.png is the
    untrained SiT through the random VAE (flat noise), {repae} the end of end-to-end training.
  {outputs['LDM-only sample grids']}: the same for the SiT trained on the E2E-VAE's latents; {ldm} {trained}
  {outputs['generated PNGs']}: generate.py's samples of random classes, as in the last LDM grid.
  {outputs['nearest-neighbour check (samples | nearest training images)']}: a row per class: its
    {SAMPLES_PER_CLASS} samples, then the nearest training image of each; in a recognised class most of the right
    half comes from that row's photograph.""")
    if "visualize_latents.py picture" in outputs:
        print(f"  {outputs['visualize_latents.py picture']}: a row per class: the image, then the first three "
              "principal\n    components of the latents as colours (4x4 latent pixels), of a random VAE and of the "
              "E2E-VAE.")


def prepare_output_folder(out):
    """An empty output folder marked as the demo's; a previous demo's folder is replaced, any other refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            sys.exit(f"{out} exists and was not made by demo.py: choose another --out")
        shutil.rmtree(out)  # a previous demo's outputs: the demo always starts from scratch
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def train_and_sample(cfg, out):
    """The pipeline from photographs to generate.py's .npz; returns the paths of what it wrote."""
    data, exps, pretrained, samples = out / "data", out / "exps", out / "pretrained", out / "samples"
    make_photo_tree(out / "photos", cfg["crops"])
    run("preprocessing", "preprocessing.py", "--imagenet-path", out / "photos", "--output-path", data,
        "--resolution", RESOLUTION, "--num-workers", 2)

    # Learning rates ten times the published ones: the tiny models start from scratch and have minutes, not days.
    common = ["--resolution", RESOLUTION, "--model", "SiT-T/2", "--vae", "f8d4-tiny",
              "--enc-type", "dinov2-vit-s", "--enc-random-init", "--encoder-depth", 2, "--num-classes", len(PHOTOS),
              "--batch-size", BATCH, "--learning-rate", 1e-3, "--report-to", "none", "--mixed-precision", "no",
              "--no-compile", "--num-workers", 0, "--sample-batch-size", 16, "--ema-decay", 0.99,
              "--log-every", cfg["log_every"], "--output-dir", exps, "--data-dir", data]
    repae_steps = cfg["repae_steps"]
    # The encoder is random: its alignment pull on the VAE is kept small next to reconstruction (published 1.5).
    run("train_repae (end-to-end SiT + VAE)", "train_repae.py", "--exp-name", "repae-demo", *common,
        "--vae-ckpt", "none", "--vae-learning-rate", 1e-3, "--vae-align-proj-coeff", 0.1, "--lpips-random-init",
        "--loss-cfg-path", "configs/demo_vae_loss.yaml", "--max-train-steps", repae_steps,
        "--checkpointing-steps", repae_steps, "--sampling-steps", repae_steps)
    repae_ckpt = exps / "repae-demo" / "checkpoints" / f"{repae_steps:07d}.pt"

    run("save_vae_weights (E2E-VAE + diffusers export)", "save_vae_weights.py", "--repae-ckpt", repae_ckpt,
        "--vae-name", "e2e-demo", "--save-dir", pretrained, "--diffusers")
    vae_ckpt = pretrained / "e2e-demo" / "e2e-demo.pt"

    run("cache_latents (frozen E2E-VAE)", "cache_latents.py", "--vae-arch", "f8d4-tiny", "--vae-ckpt-path", vae_ckpt,
        "--vae-latents-name", "e2e-demo", "--data-dir", data, "--output-dir", data, "--pproc-batch-size", 16,
        "--num-workers", 0)

    # FID (and IS) of the EMA SiT's samples against the training images at a few points of training
    ldm_steps = cfg["ldm_steps"]
    run("train_ldm_only (SiT + REPA on cached latents)", "train_ldm_only.py", "--exp-name", "ldm-demo", *common,
        "--vae-ckpt", vae_ckpt, "--vae-latents-name", "e2e-demo", "--max-train-steps", ldm_steps,
        "--checkpointing-steps", ldm_steps, "--sampling-steps", ldm_steps, "--eval-every", cfg["eval_every"],
        "--eval-ref", write_reference_npz(data, out / "evaluation" / "training_images.npz"),
        "--eval-num-samples", cfg["samples"], "--eval-batch-size", 16, "--eval-steps", cfg["sampling_steps"],
        "--eval-cfg-scale", CFG_SCALE, "--eval-metrics", "is,fid", *inception_flags())

    processes = cfg["generate_processes"]
    run(f"generate ({processes} processes, gloo)" if processes > 1 else "generate", "generate.py",
        "--exp-path", exps / "ldm-demo", "--train-steps", ldm_steps,
        "--sample-dir", samples, "--num-fid-samples", cfg["samples"], "--pproc-batch-size", 16,
        "--num-steps", cfg["sampling_steps"], "--cfg-scale", CFG_SCALE, nproc=processes)
    npz = next(samples.glob("*.npz"))
    return {
        "REPA-E checkpoint": repae_ckpt,
        "REPA-E sample grids": exps / "repae-demo" / "samples",
        "E2E-VAE (+ latent stats, discriminator)": vae_ckpt.parent,
        "E2E-VAE as a diffusers folder": vae_ckpt.parent / "diffusers",
        "cached latents": data / "e2e-demo.h5",
        "LDM-only checkpoint": exps / "ldm-demo" / "checkpoints" / f"{ldm_steps:07d}.pt",
        "LDM-only sample grids": exps / "ldm-demo" / "samples",
        "LDM-only evaluations during training (.jsonl)": exps / "ldm-demo" / "eval.jsonl",
        "generated PNGs": npz.with_suffix(""),
        "samples for FID (.npz)": npz,
    }


def main(argv=None):
    """Run every stage, check that the samples learned their classes, evaluate, and say where everything is."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out",
                        help="folder for every output; a rerun replaces it (only ever a folder demo.py made)")
    parser.add_argument("--quick", action="store_true", help="a short pass (fewer images, steps and samples)")
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "full"]
    out = args.out.resolve()
    prepare_output_folder(out)
    started = time.time()
    print("No pretrained weights are available offline: the encoder (dinov2-vit-s) and the LPIPS VGG trunk are "
          "randomly initialised, and the VAE starts from random weights.")

    outputs = train_and_sample(cfg, out)
    print("\n=== nearest-neighbour check of the LDM-only samples", flush=True)
    check_picture = out / "evaluation" / "nearest_neighbours.png"
    recognised = nearest_neighbour_check(out / "exps" / "ldm-demo", cfg["ldm_steps"], out / "data",
                                         cfg["sampling_steps"], check_picture)
    outputs["nearest-neighbour check (samples | nearest training images)"] = check_picture
    if args.quick:
        print("\nevaluate.py, eval_vae.py and visualize_latents.py: skipped by --quick (their tests run them)")
    else:
        outputs.update(evaluate_outputs(out, outputs["samples for FID (.npz)"],
                                        outputs["E2E-VAE (+ latent stats, discriminator)"] / "e2e-demo.pt"))
    (out / "summary.json").write_text(json.dumps({k: str(v) for k, v in outputs.items()}, indent=2))

    print(f"\nDemo finished in {time.time() - started:.0f} s. Outputs (a rerun replaces {out}):")
    for what, path in outputs.items():
        print(f"  {what:62s} {path}")
    print_what_to_see(outputs, cfg)
    score = sum(recognised.values())
    print("\nLosses reached:")
    print(f"  train_repae:    {last_losses(out / 'exps' / 'repae-demo' / 'log.txt')}")
    print(f"  train_ldm_only: {last_losses(out / 'exps' / 'ldm-demo' / 'log.txt')}")
    print(fid_column(outputs["LDM-only evaluations during training (.jsonl)"]))
    print(f"  nearest-neighbour check: {score}/{len(PHOTOS)} classes have most of their {SAMPLES_PER_CLASS} "
          f"samples nearest to a training image of their own class (missed: "
          f"{', '.join(PHOTOS[c] for c, ok in recognised.items() if not ok) or 'none'})")
    if not args.quick and score < PASS_MARK:
        sys.exit(f"WARNING: only {score}/{len(PHOTOS)} classes recognised, the full demo reaches at least "
                 f"{PASS_MARK}: the pipeline did not learn as it should (see {check_picture})")


if __name__ == "__main__":
    main()
