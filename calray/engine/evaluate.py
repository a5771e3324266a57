"""Evaluation, standalone: the trainer's validation and test passes and the robustness grid's
checkpoint evaluation all run `evaluate(model, loader, ...)`."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from calray.engine.metrics import EvalStats


def to_device(x, device: torch.device, channels_last: bool = False):
    """A batch (a tensor or a dict of them) on `device`; 4-D float tensors channels-last if asked."""
    if isinstance(x, dict):
        return {k: to_device(v, device, channels_last) for k, v in x.items()}
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4 and x.is_floating_point():
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def amp_autocast(enabled: bool):
    """bf16 autocast on CUDA when `enabled`; otherwise no context at all: entering a disabled
    torch.autocast costs 35–45 µs of a ~1.6 ms CPU step on small models (docs/BENCHMARKS.md §5)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, loader: DataLoader, modalities: list[str], num_classes: int, device: torch.device,
             amp: bool = False, channels_last: bool = False) -> dict:
    """Fused and per-modality accuracy, macro-F1 and loss over every sample of `loader` (all ranks'
    shards summed under DDP). The model is left in eval mode."""
    model.eval()
    stats = EvalStats(modalities, num_classes, device)
    for inputs, labels, *_ in loader:  # a training loader may also yield indices (Method.needs_sample_index)
        inputs = to_device(inputs, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        with amp_autocast(amp):
            out = model(inputs)
        loss = F.cross_entropy(out.fused_logits.float(), labels, reduction="sum")
        stats.update(labels, out.fused_logits, out.unimodal_logits, float(loss))
    return stats.all_reduce().metrics()


@torch.no_grad()
def embeddings_of(model, loader: DataLoader, device: torch.device, amp: bool = False,
                  channels_last: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every sample's embeddings (`ModelOutput.embeddings`, what the fusion sees) and labels over
    `loader` (this rank's shard only; nothing is all-reduced). The model is left in eval mode."""
    model.eval()
    embs: dict[str, list[torch.Tensor]] = {}
    labels = []
    for inputs, y, *_ in loader:
        with amp_autocast(amp):
            out = model(to_device(inputs, device, channels_last))
        for m, h in out.embeddings.items():
            embs.setdefault(m, []).append(h.float())
        labels.append(y.to(device))
    return {m: torch.cat(v) for m, v in embs.items()}, torch.cat(labels)

