"""Data order as a pure function of ``(seed, epoch)``: the training samplers (shuffled or Poisson, sharded over
``torch.distributed`` ranks) reseed themselves in ``set_epoch``, so a run resumed from an end-of-epoch checkpoint
draws the same batches as an uninterrupted one; :func:`poisson_loader` is DP-SGD's Opacus loader on top of them."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process under ``torch.distributed``, (0, 1) without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def leave_process_group() -> None:
    """Destroy this process's ``torch.distributed`` group, if any, before the interpreter exits: Lightning leaves
    it in place after a multi-process fit, and a gloo group still alive at exit can abort the process
    ("terminate called without an active exception") after a run that finished well."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _epoch_seed(seed: int, epoch: int) -> int:
    # distinct, reproducible streams per epoch (the DistributedSampler convention, seed + epoch)
    return int(seed) + int(epoch)


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch`` (reseeded by ``set_epoch``); under
    ``world_size > 1`` each rank takes every ``world_size``-th index of the same permutation (the last
    partial round is padded by wrapping, as ``DistributedSampler`` does, so every rank takes as many steps)."""

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.rank, self.world_size = int(num_samples), int(seed), rank, world_size
        self.epoch = 0
        self.skip = 0  # indices the next pass leaves out (consumed before a mid-epoch checkpoint)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            _epoch_seed(self.seed, self.epoch))).tolist()
        padded = order + order[: len(self) * self.world_size - self.num_samples]
        skip, self.skip = self.skip, 0
        return iter(padded[self.rank :: self.world_size][skip:])


class EpochPoissonSampler(Sampler[list[int]]):
    """Poisson sampling as Opacus' ``UniformWithReplacementSampler`` (each sample joins each batch
    independently with ``sample_rate``; ``steps`` batches per epoch), from a generator seeded with
    ``seed + epoch`` in ``set_epoch``. Under ``world_size > 1`` every rank draws the same global batch and
    keeps every ``world_size``-th of its indices, so the global batch is exactly one Poisson draw (what the
    accountant assumes) and all ranks take the same number of steps (empty local batches included)."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.sample_rate, self.steps = int(num_samples), float(sample_rate), int(steps)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.epoch = 0
        self.skip = 0  # batches the next pass draws but does not yield (consumed before a mid-epoch checkpoint)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def sampler(self) -> EpochPoissonSampler:
        """Itself: Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``."""
        return self

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        skip, self.skip = self.skip, 0
        for step in range(self.steps):
            chosen = (torch.rand(self.num_samples, generator=generator) < self.sample_rate).nonzero().reshape(-1)
            if step >= skip:
                yield chosen[self.rank :: self.world_size].tolist()


def poisson_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Opacus' ``DPDataLoader`` (empty-batch-safe collation, ``sample_rate`` attribute) whose batches come
    from an :class:`EpochPoissonSampler` at rate 1 / ⌈N / batch_size⌉ — the rate Opacus' own
    ``DPDataLoader.from_data_loader`` uses — sharded over ``torch.distributed`` ranks when initialised."""
    from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
    from torch.utils.data.dataloader import default_collate

    class EpochDPDataLoader(DPDataLoader):
        def __init__(self) -> None:  # DPDataLoader's own __init__ builds a sampler we replace
            rank, world_size = distributed_rank()
            steps = math.ceil(len(dataset) / batch_size)
            self.sample_rate = 1.0 / steps
            self.distributed = world_size > 1
            first = dataset[0]
            DataLoader.__init__(
                self, dataset,
                batch_sampler=EpochPoissonSampler(len(dataset), self.sample_rate, steps, seed, rank, world_size),
                collate_fn=wrap_collate_with_empty(
                    collate_fn=default_collate, sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                    dtypes=[dtype_safe(x) for x in first]),
                num_workers=num_workers, persistent_workers=num_workers > 0,
                generator=torch.Generator().manual_seed(seed),
            )

    return EpochDPDataLoader()
