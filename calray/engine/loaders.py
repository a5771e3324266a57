"""The loop's data loaders: sharded across DDP ranks, shuffled per epoch for training, whole-batch
fetching for in-memory datasets (calray.data.batched), never `drop_last` on evaluation."""

from __future__ import annotations

from torch.utils.data import DataLoader

from calray.data.batched import batched_loader
from calray.data.sampling import ShardedSampler


def make_loader(dataset, data_cfg, *, train: bool, seed: int, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """Training (`train`: shuffled with `seed`, padded to equal shards) or evaluation loader."""
    sampler = ShardedSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, pad=train)
    batch_size = data_cfg.batch_size if train else (data_cfg.eval_batch_size or data_cfg.batch_size)
    options = {"num_workers": data_cfg.num_workers, "pin_memory": pin_memory,
               "persistent_workers": data_cfg.num_workers > 0}
    whole = batched_loader(dataset, sampler, batch_size, **options)  # in-memory datasets
    if whole is not None:
        return whole
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **options)
