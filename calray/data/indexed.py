"""Training items that also carry their index: `(inputs, label, index)`, for methods that keep a
per-sample history (`Method.needs_sample_index`, e.g. QMF's ranking term). The index is the
position in the wrapped dataset, which the sampler shards across ranks, so it is the GLOBAL index
of the training split on every rank."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from calray.data.batched import batch_fetcher


class WithIndex(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._fetch = batch_fetcher(dataset)
        if self._fetch is not None:  # keep whole-batch fetching (calray.data.batched) for in-memory sets
            self.get_batch = self._get_batch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        inputs, label = self.dataset[i]
        return inputs, label, i

    def _get_batch(self, indices):
        inputs, labels = self._fetch(indices)
        return inputs, labels, torch.as_tensor(list(indices), dtype=torch.long)
