"""Deterministic, shardable samplers: the same global order on every rank, split by position.

With world size W, rank r takes positions r, r+W, r+2W, … of the epoch's order, so batch j of
every rank together is exactly batch j of a single process whose batch is W times larger.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Training: a seeded permutation per epoch, padded (by wrapping) so all ranks have equal length.
    Evaluation (`shuffle=False, pad=False`): every sample exactly once across ranks, no padding."""

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.pad and self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            idx += idx[: total - self.n]
        return idx

    def __iter__(self):
        return iter(self.order()[self.rank::self.world_size])

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))
