"""Guard against non-finite losses and gradients: skip the update, count it, stop on a run of them.

Nothing is read on the host during a step: each update's verdict is a device tensor that the fused optimizer
obeys, and the counters are read by `check` only (at logging and checkpoint steps).
"""
import torch

from utils.errors import RunEnded


class NonFiniteStop(RunEnded):
    """A run of non-finite steps as long as --max-nonfinite-steps: training stops."""


class NonFiniteGuard:
    """Counts updates skipped for a non-finite loss or gradient norm; `check` raises once max_consecutive steps in
    a row had one."""

    def __init__(self, max_consecutive=50, logger=None):
        self.max_consecutive = max_consecutive
        self.logger = logger
        self._counts = None  # device int64: skipped, consecutive, worst consecutive run since the last check
        self._bad_this_step = None
        self._skipped_by_name = {}  # name -> device count since the last check

    def _ensure(self, device):
        """The device counters: allocated on first use, moved to the device after a checkpoint restored them."""
        if self._counts is None:
            self._counts = torch.zeros(3, dtype=torch.int64, device=device)
        self._counts = self._counts.to(device)
        if self._bad_this_step is None:
            self._bad_this_step = torch.zeros((), dtype=torch.bool, device=device)

    def nonfinite(self, name, *values):
        """A device bool: is any value (loss, gradient norm) non-finite? Recorded against `name`."""
        bad = torch.stack([~torch.isfinite(v.detach().float()).all() for v in values]).any()
        self._ensure(bad.device)
        self._bad_this_step = self._bad_this_step | bad
        self._skipped_by_name[name] = self._skipped_by_name.get(name, 0) + bad.long()
        return bad

    def end_step(self):
        """Close a training step on the device: count a bad step and the length of the current run of them."""
        if self._bad_this_step is None:
            return
        bad = self._bad_this_step.long()
        skipped, consecutive, worst = self._counts.unbind()
        consecutive = (consecutive + 1) * bad
        self._counts = torch.stack([skipped + bad, consecutive, torch.maximum(worst, consecutive)])
        self._bad_this_step = torch.zeros_like(self._bad_this_step)

    def check(self, step):
        """Read the counters (a host read): warn of skipped updates; raise NonFiniteStop after a run of bad steps."""
        if self._counts is None:
            return
        for name, count in self._skipped_by_name.items():
            count = int(count)
            if count and self.logger is not None:
                self.logger.warning(f"non-finite {name} by step {step}: update skipped ({count} since the last log)")
        self._skipped_by_name = {}
        skipped, consecutive, worst = self._counts.tolist()
        self._counts[2] = consecutive
        if worst >= self.max_consecutive:
            raise NonFiniteStop(
                f"training stopped at step {step}: {worst} consecutive steps had a non-finite loss or gradient "
                f"({skipped} skipped updates in all). Lower the learning rate, use --mixed-precision bf16, or resume "
                f"from an earlier checkpoint.")

    @property
    def skipped(self):
        """Updates skipped so far (a host read)."""
        return 0 if self._counts is None else int(self._counts[0])

    def state_dict(self):
        """Counters to store in a checkpoint."""
        skipped, consecutive, _ = (0, 0, 0) if self._counts is None else self._counts.tolist()
        return {"skipped": skipped, "consecutive": consecutive}

    def load_state_dict(self, state):
        """Restore counters from a checkpoint."""
        self._counts = torch.tensor([state["skipped"], state["consecutive"], state["consecutive"]])
