"""Evaluation sums (confusion matrix, per-modality correct, loss) that all-reduce across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class EvalStats:
    def __init__(self, modalities: list[str], num_classes: int, device="cpu"):
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        self.unimodal_correct = torch.zeros(len(modalities), dtype=torch.float64, device=device)
        self.unimodal_loss = torch.zeros(len(modalities), dtype=torch.float64, device=device)  # Σ CE(p^m, y)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, labels: torch.Tensor, fused_logits: torch.Tensor, unimodal_logits: dict, loss_sum: float):
        y = labels.to(self.confusion.device).long()
        pred = fused_logits.argmax(1).to(y.device)
        k = self.num_classes
        self.confusion += torch.bincount(y * k + pred, minlength=k * k).view(k, k).to(torch.float64)
        for i, m in enumerate(self.modalities):
            self.unimodal_correct[i] += (unimodal_logits[m].argmax(1).to(y.device) == y).sum()
            self.unimodal_loss[i] += F.cross_entropy(unimodal_logits[m].float().to(y.device), y, reduction="sum").double()
        self.loss_sum += float(loss_sum)

    def all_reduce(self) -> "EvalStats":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([self.confusion.view(-1), self.unimodal_correct, self.unimodal_loss, self.loss_sum.view(1)])
            device = flat.device
            if dist.get_backend() == "nccl":
                flat = flat.cuda()
            dist.all_reduce(flat)
            flat = flat.to(device)
            k2 = self.num_classes ** 2
            self.confusion.copy_(flat[:k2].view_as(self.confusion))
            M = len(self.modalities)
            self.unimodal_correct.copy_(flat[k2:k2 + M])
            self.unimodal_loss.copy_(flat[k2 + M:k2 + 2 * M])
            self.loss_sum.copy_(flat[-1])
        return self

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def metrics(self) -> dict[str, float]:
        n = max(self.count, 1)
        tp = self.confusion.diag()
        support = self.confusion.sum(1)
        predicted = self.confusion.sum(0)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                         torch.zeros_like(tp))
        present = support > 0  # macro-F1 over the classes present in this split
        out = {
            "loss": float(self.loss_sum) / n,
            "acc": float(tp.sum()) / n,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "n": self.count,
        }
        for i, m in enumerate(self.modalities):
            out[f"acc_{m}"] = float(self.unimodal_correct[i]) / n
            out[f"loss_{m}"] = float(self.unimodal_loss[i]) / n  # per-head loss (Gradient-Blending)
        return out
