"""Pack an image folder (ImageNet train) into OUTPUT/images.h5: ADM center crops stored as uncompressed PNGs.

Layout: one byte-string dataset per image at `00000/img00000000.png`, a dataset `dataset.json`
holding {"labels": [[name, class], ...]}, and OUTPUT/images_h5.json listing every name in the file.
Classes come from a `dataset.json` in the source folder, else from the sorted top-level folder names.

    python preprocessing.py --imagenet-path /data/ILSVRC/Data/CLS-LOC/train --output-path data
"""
import argparse
import io
import json
import multiprocessing
import os
import sys
from collections import Counter

from dataset.image_files import center_crop_arr, image_files, read_rgb
from utils.cli import HelpFormatter, non_negative_int, positive_int
from utils.errors import UserError, report_user_errors

# Images wider (or taller) than this many times their short side are skipped: resizing their short side to the
# target would make a huge intermediate image (a 1x100000 strip becomes 256x25600000).
MAX_ASPECT_RATIO = 32


def image_name(index):
    """Name of the index-th image inside images.h5, e.g. 00000/img00000012.png."""
    idx = f"{index:08d}"
    return f"{idx[:5]}/img{idx}.png"


def list_images(source_dir, max_images=None):
    """Sorted (path, label or None) of every file with an image extension under source_dir, and the class count."""
    paths = image_files(source_dir)[:max_images]
    rel = {p: os.path.relpath(p, source_dir).replace(os.sep, "/") for p in paths}

    meta_path = os.path.join(source_dir, "dataset.json")
    labels = read_source_labels(meta_path) if os.path.isfile(meta_path) else None
    if labels is not None:
        return [(p, labels.get(rel[p])) for p in paths], len(set(labels.values()))

    # No dataset.json: one class per top-level folder (files at the top level form a class of their own).
    tops = {p: rel[p].split("/")[0] if "/" in rel[p] else "" for p in paths}
    classes = {name: i for i, name in enumerate(sorted(set(tops.values())))}
    return [(p, classes[tops[p]]) for p in paths], len(classes)


def read_source_labels(meta_path):
    """{relative path: class} from a source dataset.json ({"labels": [[path, class], ...]}), or None if it has none."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        labels = meta.get("labels") if isinstance(meta, dict) else []
        return None if labels is None else {name: int(label) for name, label in labels}
    except (ValueError, TypeError, AttributeError) as error:  # not JSON, or not the layout above
        raise UserError(f"{meta_path} is not a labels file {{\"labels\": [[path, class], ...]}} ({error}): fix or "
                        "remove it (without it, classes come from the folder names)") from error


def encode_png(arr):
    """Uncompressed PNG bytes of an RGB uint8 array (fast to decode while training)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def process_image(task):
    """Worker: (path, resolution) -> ("ok", png bytes, source mode, upsampled) or ("skip", reason)."""
    path, resolution = task
    try:
        arr, mode = read_rgb(path)
        h, w = arr.shape[:2]
        if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
            return "skip", f"aspect ratio {w}x{h} above {MAX_ASPECT_RATIO}:1"
        return "ok", encode_png(center_crop_arr(arr, resolution)), mode, min(h, w) < resolution
    except Exception as error:  # any undecodable file is skipped, never fatal
        return "skip", f"{type(error).__name__}: {error}".strip()


def write_dataset(h5f, name, data):
    """Store bytes as a scalar byte-string dataset at name (groups created as needed)."""
    import numpy as np

    h5f.create_dataset(name, data=np.array(data, dtype="S"))


def decode_all(pool, tasks, num_workers, chunksize=8):
    """process_image over tasks in order, one window at a time so that decoded images never pile up in memory."""
    window = 16 * chunksize * num_workers
    for start in range(0, len(tasks), window):
        yield from pool.imap(process_image, tasks[start:start + window], chunksize=chunksize)


def convert(items, h5f, resolution, num_workers):
    """Crop and store every image of items into h5f in order; returns (labels, Counter of outcomes, skipped)."""
    from tqdm import tqdm

    labels, stats, skipped = [], Counter(), []
    with multiprocessing.Pool(num_workers) as pool:
        results = decode_all(pool, [(path, resolution) for path, _ in items], num_workers)
        for (path, label), result in zip(items, tqdm(results, total=len(items), desc="Preprocessing", unit="img")):
            if result[0] == "ok" and label is None:
                result = "skip", "no label in the source dataset.json"
            if result[0] == "skip":
                skipped.append((path, result[1]))
                tqdm.write(f"skipped {path}: {result[1]}", file=sys.stderr)
                continue
            _, png, mode, upsampled = result
            name = image_name(len(labels))
            write_dataset(h5f, name, png)
            labels.append([name, label])
            if mode != "RGB":
                stats[f"converted from {mode}"] += 1
            if upsampled:
                stats["upsampled (smaller than the crop)"] += 1
    return labels, stats, skipped


def check_output(paths, overwrite):
    """Refuse to replace existing outputs unless overwrite is set."""
    for path in paths:
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")


def build_parser():
    """The preprocessing flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--imagenet-path", type=str, required=True, help="source image folder (class subfolders)")
    parser.add_argument("--output-path", type=str, default="data", help="folder for images.h5 and images_h5.json")
    parser.add_argument("--resolution", type=positive_int, default=256, help="side of the square center crop")
    parser.add_argument("--num-workers", type=non_negative_int, default=16, help="decoding processes")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N files (sorted)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv=None):
    """Convert the folder, write images.h5 and images_h5.json atomically."""
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.imagenet_path):
        raise UserError(f"--imagenet-path {args.imagenet_path} is not a folder")
    h5_path = os.path.join(args.output_path, "images.h5")
    json_path = os.path.join(args.output_path, "images_h5.json")
    check_output([h5_path, json_path], args.overwrite)

    items, num_classes = list_images(args.imagenet_path, args.max_images)
    if not items:
        raise UserError(f"--imagenet-path {args.imagenet_path}: no files with an image extension under it")
    print(f"Found {len(items)} image files in {num_classes} classes under {args.imagenet_path}")

    import h5py

    from utils.files import atomic_write

    with atomic_write(h5_path) as tmp_h5, atomic_write(json_path) as tmp_json:
        with h5py.File(tmp_h5, "w") as h5f:
            labels, stats, skipped = convert(items, h5f, args.resolution, max(args.num_workers, 1))
            if not labels:
                raise UserError(f"--imagenet-path {args.imagenet_path}: no image could be read; nothing written")
            write_dataset(h5f, "dataset.json", json.dumps({"labels": labels}).encode("utf-8"))
            names = []
            h5f.visit(names.append)
        with open(tmp_json, "w") as f:
            json.dump(names, f, indent=2)

    print(f"Wrote {len(labels)} images to {h5_path}; skipped {len(skipped)} of {len(items)} files")
    for what, count in sorted(stats.items()):
        print(f"  {what}: {count}")
    return labels, stats, skipped


if __name__ == "__main__":
    report_user_errors(main)()
