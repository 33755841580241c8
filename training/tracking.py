"""Experiment logging: the log file and the metric trackers (wandb / tensorboard / none)."""
import importlib.util
import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from utils.errors import UserError


def create_logger(exp_dir, is_main):
    """Logger writing to stdout and EXP/log.txt (stdout only when exp_dir is None) on the main process; silent
    elsewhere."""
    logger = logging.getLogger("repae")
    for handler in logger.handlers:  # a run started earlier in this process closes its log file
        handler.close()
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


def check_trackers(names):
    """UserError unless every tracker can start here: tensorboard is installed; wandb runs offline or has a login
    (WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes)."""
    for name in names or []:
        if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise UserError("--report-to tensorboard: the tensorboard package is not installed: pip install "
                            "tensorboard, or pass --report-to wandb or none")
        if name != "wandb" or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") \
                or os.environ.get("WANDB_API_KEY"):
            continue
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        try:
            logged_in = netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            logged_in = False
        if not logged_in:
            raise UserError("--report-to wandb: this machine has no wandb login: run `wandb login` (or set "
                            "WANDB_API_KEY), or set WANDB_MODE=offline to log into ./wandb and `wandb sync` later, or "
                            "pass --report-to tensorboard or none")


