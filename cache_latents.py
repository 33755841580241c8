"""Encode DATA/images.h5 with a VAE into OUTPUT/NAME.h5 (posterior mean and std per image).

    accelerate launch --num_processes=8 cache_latents.py --vae-arch f16d32 \
        --vae-ckpt-path pretrained/e2e-vavae/e2e-vavae-400k.pt --vae-latents-name e2e-vavae

Every global batch is split into one contiguous slice per process; rank 0 gathers the slices, so the latents
arrive in dataset order, and writes `00000/img-mean-std-00000000.npy` float32 (2C, h, w) entries (mean, then
std), a `dataset.json` entry with the labels and OUTPUT/NAME_h5.json listing the names. Each image is encoded
exactly once whatever the number of processes.
"""
import argparse
import json
import os

from utils.cli import VAE_CKPT_HELP, HelpFormatter, non_negative_int, positive_int, vae_kind_help
from utils.errors import UserError, report_user_errors


def rank_slices(num_items, batch_size, num_processes, rank):
    """Per global step, this rank's contiguous index range (possibly empty at the end of the data)."""
    step = batch_size * num_processes
    return [range(min(start + rank * batch_size, num_items), min(start + (rank + 1) * batch_size, num_items))
            for start in range(0, num_items, step)]


def encode(vae, images):
    """uint8 images -> float32 (B, 2C, h, w): posterior mean then posterior std."""
    import torch

    from models.autoencoder import preprocess_imgs_vae

    with torch.no_grad():
        posterior = vae.encode(preprocess_imgs_vae(images))
        return torch.cat([posterior.mean, posterior.std], dim=1).float()


def gathered_latents(vae, loader, slices, batch_size, accelerator, shape):
    """Per global step, the latents of all processes in dataset order (every process takes part in the gather)."""
    import torch

    batches = iter(loader)
    for indices in slices:
        # Pad to a fixed size so all processes gather equal shapes; slices are contiguous, so row k of the
        # gathered tensor is image step * batch_size * world + k.
        local = torch.zeros((batch_size, *shape), device=accelerator.device)
        if len(indices):
            images, _ = next(batches)
            local[:len(indices)] = encode(vae, images.to(accelerator.device))
        yield accelerator.gather(local)


def write_latents(h5_path, json_path, names, labels, batches, desc):
    """Write each latent as a raw float32 array at its name, the labels, then the name list; all or nothing."""
    import h5py
    import numpy as np
    from tqdm import tqdm

    from utils.files import atomic_write

    progress = tqdm(total=len(names), desc=desc, unit="img")
    with atomic_write(h5_path) as tmp_h5, atomic_write(json_path) as tmp_json:
        with h5py.File(tmp_h5, "w") as h5f:
            start = 0
            for latents in batches:
                count = min(len(latents), len(names) - start)
                for name, latent in zip(names[start:start + count], latents[:count].cpu().numpy()):
                    h5f.create_dataset(name, data=latent)
                start += count
                progress.update(count)
            pairs = [[name, int(label)] for name, label in zip(names, labels)]
            h5f.create_dataset("dataset.json", data=np.array(json.dumps({"labels": pairs}).encode("utf-8"), dtype="S"))
        with open(tmp_json, "w") as f:
            json.dump(names + ["dataset.json"], f, indent=2)
    progress.close()


def build_parser():
    """The caching flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--vae-arch", type=str, default="f16d32", help=vae_kind_help("--vae-ckpt-path"))
    parser.add_argument("--vae-ckpt-path", type=str, default="pretrained/repae-invae-400k/repae-invae-400k.pt",
                        help=VAE_CKPT_HELP)
    parser.add_argument("--vae-latents-name", type=str, default="repae-invae-400k",
                        help="writes OUTPUT/NAME.h5 and OUTPUT/NAME_h5.json")
    parser.add_argument("--data-dir", type=str, default="data", help="folder holding images.h5")
    parser.add_argument("--output-dir", type=str, default="data", help="folder for NAME.h5 and NAME_h5.json")
    parser.add_argument("--pproc-batch-size", type=positive_int, default=128, help="images per process per step")
    parser.add_argument("--num-workers", type=non_negative_int, default=4, help="DataLoader workers per process")
    parser.add_argument("--vae-random-init", action="store_true", help="random VAE weights (smoke runs)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv=None):
    """Encode this rank's share of every batch, gather and write on rank 0."""
    args = build_parser().parse_args(argv)
    h5_path = os.path.join(args.output_dir, f"{args.vae_latents_name}.h5")
    json_path = os.path.join(args.output_dir, f"{args.vae_latents_name}_h5.json")
    for path in (h5_path, json_path):
        if os.path.exists(path) and not args.overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")

    from torch.utils.data import DataLoader

    from dataset.h5 import ImageDataset, latent_name
    from models.autoencoder import latent_shape
    from training.distributed import launched_accelerator
    from weights.vae import resolve_vae

    vae_source = resolve_vae(args.vae_arch, "none" if args.vae_random_init else args.vae_ckpt_path,
                             arch_flag="--vae-arch", ckpt_flag="--vae-ckpt-path")
    dataset = ImageDataset(args.data_dir)

    accelerator = launched_accelerator()
    vae, _ = vae_source.load(seed=0)  # a random VAE (smoke runs) has the same weights on every process
    vae = vae.to(accelerator.device).eval()
    channels, height, width = latent_shape(vae, dataset.image_size[0])  # images.h5 holds square crops
    shape = (2 * channels, height, width)
    world, batch_size = accelerator.num_processes, args.pproc_batch_size
    slices = rank_slices(len(dataset), batch_size, world, accelerator.process_index)
    loader = DataLoader(dataset, batch_sampler=[list(s) for s in slices if len(s)], num_workers=args.num_workers)
    batches = gathered_latents(vae, loader, slices, batch_size, accelerator, shape)
    if accelerator.is_main_process:
        names = [latent_name(name) for name in dataset.filelist]
        write_latents(h5_path, json_path, names, dataset.labels, batches, f"Encoding with {world} process(es)")
        print(f"Wrote {len(names)} latents {shape} to {h5_path}")
    else:
        for _ in batches:
            pass
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    report_user_errors(main)()
