"""count_host_reads counts the tensor methods that read values to the host, and restores them afterwards."""
import torch

from utils.host_reads import count_host_reads


def test_count_host_reads_counts_item_float_and_bool():
    x, item = torch.ones(2), torch.Tensor.item
    with count_host_reads() as reads:
        x.sum().item()
        float(x[0])
        bool(x[1] > 0)
        x + 1  # no read
    assert reads["reads"] == 3
    assert torch.Tensor.item is item  # restored
