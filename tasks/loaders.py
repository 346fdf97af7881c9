"""Loaders: a split's dataset, sharded by rank and reshuffled deterministically every epoch from ``seed``.

All formats yield ``(PIL RGB image, target)`` before the transform, so one transform (from the
backbone's timm data config) serves them all; the target is a class index, or a float vector of
findings for multi_label tasks. ``cache`` is the data cache folder formats may prepare data in
(tasks/datacache.py; a job passes ``<store>/data-cache``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .formats import get_format
from tasks.codecs.images import DatasetError
from .spec import SPLITS, TaskSpec
from .transforms import default_transform

__all__ = ["ShardSampler", "TaskLoader", "build_dataset", "build_loader"]


def build_dataset(spec: TaskSpec, split: str, transform: Callable | None = None, *, cache: str | None = None):
    """The split of ``spec`` as its format builds it: a Dataset (npz, folders, tables) or a self-sharding
    IterableDataset (Parquet).

    Items are ``(transform(PIL RGB image), target)``; with ``transform=None`` the PIL image itself.
    """
    if split not in SPLITS:
        raise DatasetError(f"split={split!r} must be one of {SPLITS}")
    fmt = get_format(spec.format)
    return fmt.build(spec, split, transform, cache=cache) if fmt.uses_cache else fmt.build(spec, split, transform)


class ShardSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across ranks like DistributedSampler (padding by wrap).

    Kept rather than torch's DistributedSampler, which pads and strides across ranks the same way but
    seeds its permutation with ``seed + epoch``: run seed s at epoch e + 1 would replay the order of seed
    s + 1 at epoch e. Here the order is drawn from the pair (seed, epoch), and stays the one that recorded
    runs and checkpoints were trained with, so resuming them stays exact.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int, drop_last: bool):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        per = len(self)
        total = per * self.world_size
        if total > self.n:
            order = np.resize(order, total)  # wraps around
        return iter(order[self.rank : total : self.world_size].tolist())


class TaskLoader(DataLoader):
    """A DataLoader that moves to the next epoch's order every time it is iterated.

    ``set_epoch(e)`` jumps to a given epoch (e.g. after resuming from a checkpoint).
    """

    def __init__(self, *args, shard: ShardSampler | IterableDataset, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._shard = shard
        self._seed = seed
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def __iter__(self):
        from shpeft_core.train import epoch_seed

        self._shard.set_epoch(self._next_epoch)
        # Worker processes seed their own `random`/torch RNGs (and so the augmentation) from this
        # generator: reseed it per epoch so epoch e draws the same whether or not epochs ran before it.
        self.generator.manual_seed(epoch_seed(self._seed, self._next_epoch))
        self._next_epoch += 1
        return super().__iter__()


def build_loader(
    spec: TaskSpec,
    split: str,
    *,
    transform: Callable | None,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    cache: str | None = None,
) -> TaskLoader:
    """A loader of ``(images float [B,3,H,W], targets)`` for this rank's shard: labels long [B], or float
    [B, findings] (1 / 0 / NaN unknown) for multi_label tasks.

    Every rank gets the same number of samples (the shortest ranks repeat a few from the start),
    so DDP ranks stay in step. ``transform=None`` uses :func:`default_transform`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    transform = transform or default_transform(spec)
    ds = build_dataset(spec, split, transform, cache=cache)
    generator = torch.Generator().manual_seed(seed)
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=False,
    )
    if isinstance(ds, IterableDataset):
        # A stream shards itself (tasks.formats.base); the epoch travels inside the dataset copy,
        # so its workers restart every epoch
        ds.configure(shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        return TaskLoader(ds, shard=ds, seed=seed, persistent_workers=False, **common)
    sampler = ShardSampler(len(ds), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=False)
    # Workers are started per epoch, not kept: a worker seeds its augmentation RNGs once, when it starts,
    # so only fresh workers make epoch e's crops a function of (seed, e), as an exact resume needs.
    return TaskLoader(ds, sampler=sampler, shard=sampler, seed=seed, persistent_workers=False, **common)
