"""Whole-batch fetching for in-memory datasets.

A DataLoader normally calls `dataset[i]` once per sample and then stacks the samples (collate).
For datasets that already hold their inputs as tensors (`synthetic`, `features`) that per-sample
Python work costs a quarter of a small model's step. Such a dataset offers
`get_batch(indices) -> (inputs, labels)`, one indexing per modality, and `batched_loader` feeds it
the sampler's indices a batch at a time. The batches are the same, in the same order.
"""

from __future__ import annotations

from typing import Callable

from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset


def batch_fetcher(dataset: Dataset) -> Callable | None:
    """`get_batch` of the dataset, looking through (nested) Subsets; None when it has none."""
    if isinstance(dataset, Subset):
        inner = batch_fetcher(dataset.dataset)
        if inner is None:
            return None
        indices = dataset.indices
        return lambda idx: inner([indices[i] for i in idx])
    return getattr(dataset, "get_batch", None)


class _Batches(Dataset):
    """Indexed by a list of sample indices (what a BatchSampler yields); returns a whole batch."""

    def __init__(self, dataset: Dataset, fetch: Callable):
        self.dataset, self.fetch = dataset, fetch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices):
        return self.fetch(indices)


class EpochBatchSampler(BatchSampler):
    """A BatchSampler that passes `set_epoch` on to its sampler (shuffling per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def batched_loader(dataset: Dataset, sampler, batch_size: int, **kwargs) -> DataLoader | None:
    """A DataLoader yielding the batches `DataLoader(dataset, batch_size, sampler=sampler)` would,
    fetched whole; None when the dataset cannot fetch batches."""
    fetch = batch_fetcher(dataset)
    if fetch is None:
        return None
    batches = EpochBatchSampler(sampler, batch_size, drop_last=False)
    return DataLoader(_Batches(dataset, fetch), sampler=batches, batch_size=None, **kwargs)
