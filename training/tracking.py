"""Experiment logging: the log file and the metric trackers (wandb / tensorboard / none)."""
import logging
from pathlib import Path

from utils.errors import UserError


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
            raise UserError(f"--report-to {report_to!r}: choose wandb, tensorboard or none")
    return names or None


