"""Guard against non-finite losses and gradients: skip the update, count it, stop on a run of them."""
import math


class NonFiniteGuard:
    """Counts skipped updates; raises once max_consecutive steps in a row had a non-finite value."""

    def __init__(self, max_consecutive=50, logger=None):
        self.max_consecutive = max_consecutive
        self.logger = logger
        self.skipped = 0
        self.consecutive = 0
        self._bad_this_step = False

    def is_finite(self, name, *values):
        """True when every value (tensor or float) is finite; otherwise record and warn."""
        values = [float(v.detach()) if hasattr(v, "detach") else float(v) for v in values]
        finite = all(math.isfinite(v) for v in values)
        if not finite:
            self.skipped += 1
            self._bad_this_step = True
            if self.logger is not None:
                self.logger.warning(f"non-finite {name} ({', '.join(f'{v:.4g}' for v in values)}): update skipped")
        return finite

    def end_step(self, step):
        """Close a training step; raise RuntimeError after too many bad steps in a row."""
        self.consecutive = self.consecutive + 1 if self._bad_this_step else 0
        self._bad_this_step = False
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"training stopped at step {step}: {self.consecutive} consecutive steps had a non-finite loss or "
                f"gradient ({self.skipped} skipped updates in all). Lower the learning rate, use "
                f"--mixed-precision bf16, or resume from an earlier checkpoint.")

    def state_dict(self):
        """Counters to store in a checkpoint."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state):
        """Restore counters from a checkpoint."""
        self.skipped = state["skipped"]
        self.consecutive = state["consecutive"]
