"""Experiment logging: the log file, metric trackers (wandb / tensorboard / none) and sample grids."""
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def create_logger(exp_dir, is_main):
    """Logger writing to stdout and EXP/log.txt (stdout only when exp_dir is None) on the main process; silent
    elsewhere."""
    logger = logging.getLogger("repae")
    logger.handlers.clear()
    logger.propagate = False
    if is_main:
        logger.setLevel(logging.INFO)
        formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler()]
        if exp_dir is not None:
            handlers.append(logging.FileHandler(Path(exp_dir) / "log.txt"))
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.ERROR)
    return logger


def tracker_names(report_to):
    """Parse --report-to into the tracker list accelerate takes (None for 'none')."""
    names = [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]
    for name in names:
        if name not in ("wandb", "tensorboard"):
            raise SystemExit(f"--report-to {report_to!r}: choose wandb, tensorboard or none")
    return names or None


def array2grid(images):
    """(N,3,H,W) floats in [0,1] -> one uint8 HWC grid, square-ish as published."""
    nrow = round(math.sqrt(images.size(0)))
    grid = make_grid(images.clamp(0, 1), nrow=nrow, value_range=(0, 1))
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def save_sample_grid(accelerator, images, path, step):
    """Write the grid PNG at path and log it to every active tracker."""
    grid = array2grid(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            tracker.log({"samples": wandb.Image(grid)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.ascontiguousarray(grid), step, dataformats="HWC")
    return path
