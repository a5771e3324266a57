"""torch.distributed helpers the loop needs without knowing about Ray: is a process group running,
SUM all-reduce, and the check that every rank holds bit-identical W, a and β."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
import torch.distributed as dist

from calray.errors import TrainingError


def is_distributed() -> bool:
    """A process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The SUM over ranks of `t` (a copy; `t` itself when not distributed)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def average_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The MEAN over ranks of each tensor, in one flat all-reduce (the tensors themselves when not
    distributed): what DDP does to gradients, for plug-ins that compute their own (`own_backward`)."""
    world = world_size()
    if world == 1 or not tensors:
        return list(tensors)
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors])) / world
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def gather_interleaved(t: torch.Tensor) -> torch.Tensor:
    """A whole split from every rank's evaluation shard (rows r, r+W, r+2W, … on rank r: the
    evaluation ShardedSampler), in the split's order, on every rank; `t` itself when not distributed."""
    world = world_size()
    if world == 1:
        return t
    sizes = [torch.zeros((), dtype=torch.long, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(len(t), device=t.device))
    longest = int(max(sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    out = torch.empty((int(sum(sizes)), *t.shape[1:]), dtype=t.dtype, device=t.device)
    for r, (shard, n) in enumerate(zip(shards, sizes)):
        out[r::world] = shard[:int(n)]
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class RankMismatchError(TrainingError):
    """Ranks hold different values of something that must be identical everywhere (W, a, β)."""


# ---------------------------------------------------------------------------- consistency check


def _flatten(values: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[float]]:
    keys, vals = [], []
    for group in sorted(values):
        for name in sorted(values[group]):
            keys.append(f"{group}_{name}")
            vals.append(float(values[group][name]))
    return keys, vals


def _checksum(keys: list[str], vals: list[float]) -> int:
    h = hashlib.sha256()
    h.update("\0".join(keys).encode())
    h.update(torch.tensor(vals, dtype=torch.float64).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def assert_ranks_agree(values: Mapping[str, Mapping[str, float]], device: torch.device | str | None = None,
                       what: str = "contributions") -> None:
    """Fail loudly unless every rank holds bit-identical `values` ({"W": {mod: v}, "a": ..., ...}).

    All-gathers one int64 checksum (SHA-256 of the names and the float64 bytes) per rank; only on
    a mismatch are the full values gathered, so the error names each disagreeing rank and value.
    Every rank raises, so no rank is left waiting in a collective. No-op without an initialised
    process group or with world size 1. Called by the trainer at every contribution refresh when
    `distributed.check_consistency` is true.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    keys, vals = _flatten(values)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([len(vals), _checksum(keys, vals)], dtype=torch.int64, device=dev)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    table: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(table, dict(zip(keys, vals)))
    ref = table[0]
    lines = []
    for r, row in enumerate(table[1:], start=1):
        diffs = [f"{k}: rank 0 {ref.get(k)!r} vs rank {r} {row.get(k)!r}"
                 for k in sorted(set(ref) | set(row)) if ref.get(k) != row.get(k)]
        if diffs:
            lines.append(f"rank {r} differs from rank 0 in " + "; ".join(diffs))
    raise RankMismatchError(
        f"ranks disagree on the {what} (they must be bit-identical after the SUM all-reduce; this rank: "
        f"{dist.get_rank()}): " + " | ".join(lines))
