"""The loop's contribution monitor (paper eq 1–10): per-step additive statistics in a window, SUM
all-reduced across ranks and turned into W at each refresh (epoch end, or every
`method.update_every` steps). It only observes; plug-ins react to W (calray.method.base)."""

from __future__ import annotations

import torch

from calray.method.contribution import ContributionStats, ContributionTracker, Contributions

STATS_FLUSH_EVERY = 64  # contribution statistics are accumulated in batches of this many steps


class ContributionMonitor:
    def __init__(self, cfg, modalities: list[str], fusion, num_classes: int, device: torch.device):
        m = cfg.method
        self.enabled = m.track_contributions
        self.space = m.contribution_space
        self.modalities = list(modalities)
        self.tracker = ContributionTracker(self.modalities, m.contribution, m.n, m.mi_shrinkage)
        if self.space == "logits":  # the pair I(m) is measured on: (p^m, p^f), K dims each
            dims, fused = {k: num_classes for k in self.modalities}, num_classes
        else:  # (z_m or h_m, the fusion's fused representation)
            dims = dict(fusion.dims)
            with torch.no_grad():
                zeros = {k: torch.zeros(1, d, device=device) for k, d in fusion.dims.items()}
                fused = int(fusion(zeros)[0].shape[1])
        self.window = ContributionStats(self.modalities, dims, fused, device=device, flush_every=STATS_FLUSH_EVERY)
        self.epoch_stats = ContributionStats(self.modalities, dims, fused, device=device, flush_every=STATS_FLUSH_EVERY)

    def start_epoch(self) -> None:
        self.window.reset()
        self.epoch_stats.reset()

    def update(self, out, labels: torch.Tensor) -> None:
        if not self.enabled:
            return
        if self.space == "logits":  # the measured pair is (p^m, p^f) itself
            self.window.update(labels, out.fused_logits, out.unimodal_logits, out.ablated_logits)
        else:
            self.window.update(labels, out.fused_logits, out.unimodal_logits, out.ablated_logits,
                               out.embeddings, out.fused_repr)

    def refresh(self, end_of_epoch: bool) -> Contributions | None:
        """All-reduce the window's sums, then W from the epoch's sums (at its end) or the window's."""
        if not self.enabled:
            return None
        self.window.all_reduce()
        self.epoch_stats.merge(self.window)
        c = self.tracker.compute(self.epoch_stats if end_of_epoch else self.window, end_of_epoch)
        self.window.reset()
        return c

    def train_accuracy(self) -> dict[str, float]:
        """Fused and per-modality training accuracy of the epoch so far."""
        if not self.enabled:
            return {}
        row = {"train_acc": self.epoch_stats.fused_accuracy()}
        row.update({f"train_acc_{m}": v for m, v in self.epoch_stats.unimodal_accuracy().items()})
        return row
