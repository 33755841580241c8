"""Counting reads of tensor values back to the host (on GPUs, each one stalls the device)."""
import contextlib

# Tensor methods that read a value to the host: on CPU the closest thing to a device synchronization.
HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__")


@contextlib.contextmanager
def count_host_reads():
    """Count host reads of tensor values (a dict with 'reads'); on CUDA also warn on every synchronizing call."""
    import torch

    counter = {"reads": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(original):
        def wrapper(*args, **kwargs):
            counter["reads"] += 1
            return original(*args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
