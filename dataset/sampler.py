"""The data order of a training run: torch's DistributedSampler order, resumable mid-epoch."""
import torch
from torch.utils.data import Sampler

from utils.errors import UserError


class ResumableDistributedSampler(Sampler):
    """torch's DistributedSampler order (seed + epoch shuffle, rank::num_replicas) that can start mid-epoch.

    Resume at local batch b of an epoch with `set_epoch(epoch, start_index=b * local_batch_size)`.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0, shuffle=True, drop_last=True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.dataset_size = len(dataset)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        if drop_last:
            self.num_samples = self.dataset_size // num_replicas
        else:
            self.num_samples = -(-self.dataset_size // num_replicas)
        if self.num_samples == 0:
            raise UserError(f"the dataset's {self.dataset_size} samples cannot feed {num_replicas} processes: "
                            "use more images or fewer processes")
        self.total_size = self.num_samples * num_replicas
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch, start_index=0):
        """Select the epoch's order; skip this rank's first start_index samples of it."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} is outside [0, {self.num_samples}]")
        self.epoch, self.start_index = epoch, start_index

    def epoch_indices(self):
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_size))
        if self.drop_last:
            indices = indices[:self.total_size]
        else:  # pad by repeating from the start, as DistributedSampler does
            indices = (indices * (-(-self.total_size // len(indices))))[:self.total_size]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return iter(self.epoch_indices()[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index
