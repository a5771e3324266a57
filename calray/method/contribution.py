"""Modality contribution W = D × I (paper section III-A, eq 1–10) from additive statistics.

Everything the metric needs is a *sum* over training samples (`ContributionStats`), so
statistics of two shards merge by addition and, under DDP, one SUM all-reduce makes every
rank hold the global sums — and hence bit-identical W, a and β.

Readings of the paper (see docs/METHOD.md):
- I(m) (eq 1, 3–6): Gaussian MI between modality m's representation and the fused one. By
  default the pair is (unimodal logits p^m, fused logits p^f), 2K dimensions: with concat
  fusion the fused *embedding* contains h_m itself and the embedding-space MI is infinite
  (only the shrinkage keeps it finite). `space="embeddings"` measures (z_m, fused repr).
- P^m(t) of eq 9 is eq 7's "single-modality prediction accuracy": the mean probability the
  unimodal head gives the true label, accumulated over the training epoch.
- φ(m) (eq 8): mean of log p(y|all) − log p(y|all without m), "without m" = the fusion run
  with m's embedding zero-filled (or replaced by its running mean).
- R^m(t, n) (eq 9) with t − n clipped at the first epoch, so the first epoch gives R = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calray.registry import CONTRIBUTIONS

R_EPS = 1e-8  # ε of eq 9


# ------------------------------------------------------------------ eq 3–6: Gaussian MI


def shrink_covariance(cov: torch.Tensor, shrinkage: float, dx: int | None = None) -> torch.Tensor:
    """(1 − s)·Σ + s·τ, τ a scaled identity: positive definite for s > 0.

    With `dx` the target is block-wise, τ = diag((tr Σ_X/d_X)·I, (tr Σ_Y/d_Y)·I), so each
    block is shrunk toward its *own* scale and the MI stays invariant to rescaling X or Y (a
    single tr Σ/d would swamp a small-scale block, e.g. a weak modality's logits, and bias its
    MI toward 0). A block with zero trace uses 1.
    """
    d = cov.shape[0]
    bounds = [(0, d)] if dx is None else [(0, dx), (dx, d)]
    diag = torch.empty(d, dtype=cov.dtype, device=cov.device)
    for lo, hi in bounds:
        t = torch.trace(cov[lo:hi, lo:hi]) / max(hi - lo, 1)
        diag[lo:hi] = t if t > 0 else 1.0
    return (1.0 - shrinkage) * cov + shrinkage * torch.diag(diag)


def mi_from_covariance(cov: torch.Tensor, dx: int, shrinkage: float = 1e-3) -> float:
    """Eq 5: I(X;Y) = ½·log(det Σ_X · det Σ_Y / det Σ_Z), in nats, from the joint covariance Σ_Z
    of Z = [X, Y] (eq 6; X the first `dx` coordinates).

    Shrinkage (toward a per-block scaled identity, see `shrink_covariance`) is applied to the
    joint matrix and the marginals are its diagonal blocks, so by Fischer's inequality the
    result is ≥ 0 (up to rounding) and finite for any s > 0.
    """
    cov = cov.to(torch.float64)
    cov = 0.5 * (cov + cov.T)
    if shrinkage > 0:
        cov = shrink_covariance(cov, shrinkage, dx)
    _, logdet_x = torch.linalg.slogdet(cov[:dx, :dx])
    _, logdet_y = torch.linalg.slogdet(cov[dx:, dx:])
    sign_z, logdet_z = torch.linalg.slogdet(cov)
    if sign_z <= 0:
        return math.inf
    return max(0.5 * float(logdet_x + logdet_y - logdet_z), 0.0)


def gaussian_mi(x: torch.Tensor, y: torch.Tensor, shrinkage: float = 1e-3) -> float:
    """Gaussian mutual information I(X;Y) in nats (eq 3–6) between samples x (N×dx) and y (N×dy).

    Computed in float64 with `slogdet`; `shrinkage` pulls the joint covariance toward a scaled
    identity (per block, so the value is invariant to rescaling x or y) so the value is finite
    when N < dx + dy.
    """
    x = x.reshape(len(x), -1).to(torch.float64)
    y = y.reshape(len(y), -1).to(torch.float64)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples, y has {len(y)}")
    z = torch.cat([x, y], dim=1)
    zc = z - z.mean(0, keepdim=True)
    cov = zc.T @ zc / max(len(z) - 1, 1)
    return mi_from_covariance(cov, x.shape[1], shrinkage)


# ------------------------------------------------------------------ additive statistics


class ContributionStats:
    """Additive sufficient statistics of one accumulation window (an epoch by default).

    Sums over samples: count; fused correct; per modality Σ[log p(y|all) − log p(y|all∖m)]
    (eq 8), Σ p^m(y|x^m) (eq 7), Σ unimodal correct, Σ KL(p^f ‖ p^m), and the first and second
    moments of Z_m = [r_m, r_f] for the MI of eq 5. All float64 (the per-sample log-probabilities
    behind the eq 8, eq 7 and KL sums are computed in float32 from float32 logits).

    `flush_every=k` buffers k batches and accumulates them in one batched call (the same sums,
    ~k× fewer small kernels per step); every reader flushes first.
    """

    def __init__(self, modalities: list[str], rep_dims: dict[str, int], fused_dim: int,
                 device: torch.device | str = "cpu", flush_every: int = 1):
        self.modalities = list(modalities)
        self.rep_dims = dict(rep_dims)
        self.fused_dim = fused_dim
        self.device = torch.device(device)
        self.flush_every = flush_every
        self._pending: list[tuple] = []
        self.reset()

    def _zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=self.device)

    def reset(self) -> None:
        self._pending = []
        m = len(self.modalities)
        self.count = self._zeros(())
        self.fused_correct = self._zeros(())
        self.loglik_gain = self._zeros(m)
        self.true_prob = self._zeros(m)
        self.correct = self._zeros(m)
        self.kl_sum = self._zeros(m)
        dims = {d + self.fused_dim for d in self.rep_dims.values()}
        self._stacked = len(dims) == 1  # equal sizes (e.g. logits): one batched matmul for all modalities
        if self._stacked:
            d = dims.pop()
            self._sum_z_all, self._sum_zz_all = self._zeros(m, d), self._zeros(m, d, d)
            self.sum_z = {k: self._sum_z_all[i] for i, k in enumerate(self.modalities)}
            self.sum_zz = {k: self._sum_zz_all[i] for i, k in enumerate(self.modalities)}
        else:
            self.sum_z = {k: self._zeros(d + self.fused_dim) for k, d in self.rep_dims.items()}
            self.sum_zz = {k: self._zeros(d + self.fused_dim, d + self.fused_dim) for k, d in self.rep_dims.items()}

    def _tensors(self) -> list[torch.Tensor]:
        self.flush()
        out = [self.count, self.fused_correct, self.loglik_gain, self.true_prob, self.correct, self.kl_sum]
        for k in self.modalities:
            out += [self.sum_z[k], self.sum_zz[k]]
        return out

    def update(self, labels: torch.Tensor, fused_logits: torch.Tensor,
               unimodal_logits: dict[str, torch.Tensor], ablated_logits: dict[str, torch.Tensor],
               reps: dict[str, torch.Tensor] | None = None, fused_rep: torch.Tensor | None = None) -> None:
        """One batch. `reps`/`fused_rep`: the pair I(m) is measured on; None: the logits themselves
        (p^m, p^f), which are then not stored twice. Called every training step: kept lean (one
        stack per step; concatenation and the sums happen once per flush)."""
        mods = self.modalities
        logits = torch.stack([fused_logits, *[unimodal_logits[m] for m in mods], *[ablated_logits[m] for m in mods]])
        rep = None
        if reps is not None:
            n = len(labels)
            rep = ([reps[m].detach().reshape(n, -1) for m in mods], fused_rep.detach().reshape(n, -1))
        self._pending.append((labels, logits.detach(), rep))
        if len(self._pending) >= self.flush_every:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Accumulate the buffered batches into the sums."""
        if not self._pending:
            return
        batches, self._pending = self._pending, []

        def cat(tensors, dim=0):
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)

        labels, logits = cat([b[0] for b in batches]), cat([b[1] for b in batches], 1)  # (1+2M)×N×K
        m = len(self.modalities)
        if len({b[2] is None for b in batches}) > 1:
            raise ValueError("ContributionStats: updates with and without reps in one window")
        if batches[0][2] is None:  # the measured pair is the logits: (p^m, p^f)
            reps, fused_rep = list(logits[1:1 + m]), logits[0]
        else:
            reps = [cat(r) for r in zip(*(b[2][0] for b in batches))]
            fused_rep = cat([b[2][1] for b in batches])
        self._accumulate(labels, logits, reps, fused_rep)

    def _accumulate(self, labels, logits, reps, fused_rep) -> None:
        """`logits`: S×N×K, S = 1 + 2M: fused, then each modality's unimodal, then its ablated logits."""
        y = labels.to(self.device).long()
        f64 = torch.float64
        mods = self.modalities
        M, N = len(mods), len(y)
        logits = logits.to(self.device)
        # predictions from the raw logits (the evaluation's argmax), fused and unimodal sets only
        correct = (logits[:1 + M].argmax(2) == y[None]).sum(1)
        # log-softmax over K in a class-major layout: reductions along a dim of K ≈ 6 elements are
        # ~7× slower on CPU than along the N samples; in float32 (unless the logits are float64), since
        # torch's float64 kernel is ~12× slower on CPU — the per-sample values carry ~1e-7 relative
        # error, their sums below are float64 (docs/BENCHMARKS.md §5)
        work = f64 if logits.dtype == f64 else torch.float32
        logp = F.log_softmax(logits.to(work).transpose(1, 2).contiguous(), dim=1)  # S×K×N
        lp_true = logp.gather(1, y[None, None].expand(len(logp), 1, N)).squeeze(1).to(f64)  # S×N
        lp_f, lp_u, lp_a = lp_true[0], lp_true[1:1 + M], lp_true[1 + M:]
        self.count += N
        self.fused_correct += correct[0]
        self.correct += correct[1:]
        self.loglik_gain += (lp_f[None] - lp_a).sum(1)
        self.true_prob += lp_u.exp().sum(1)
        logp_f = logp[0]
        self.kl_sum += (logp_f.exp()[None] * (logp_f[None] - logp[1:1 + M])).sum((1, 2), dtype=f64)
        f = fused_rep.to(self.device, f64).reshape(N, -1)
        if self._stacked:
            r = torch.stack(list(reps)).to(self.device, f64).reshape(M, N, -1)
            z = torch.cat([r, f[None].expand(M, -1, -1)], dim=2)  # M×N×(d+d_f)
            self._sum_z_all += z.sum(1)
            self._sum_zz_all += z.transpose(1, 2) @ z
        else:
            for k, r in zip(mods, reps):
                z = torch.cat([r.to(self.device, f64).reshape(N, -1), f], dim=1)
                self.sum_z[k] += z.sum(0)
                self.sum_zz[k] += z.T @ z

    def merge(self, other: "ContributionStats") -> "ContributionStats":
        for a, b in zip(self._tensors(), other._tensors()):
            a += b.to(a.device)
        return self

    def all_reduce(self) -> "ContributionStats":
        """SUM every statistic across ranks in one collective; a no-op without torch.distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        tensors = self._tensors()
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if dist.get_backend() == "nccl" and flat.device.type != "cuda":
            flat = flat.cuda()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(self.device)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        return self

    # ---- derived quantities (all per modality)

    def _per_sample(self, sums: torch.Tensor) -> dict[str, float]:
        self.flush()
        n = max(float(self.count), 1.0)
        return {m: float(sums[i]) / n for i, m in enumerate(self.modalities)}

    def phi(self) -> dict[str, float]:
        """Eq 8: φ(m) = mean_i [log p(y_i | all) − log p(y_i | all ∖ m)]."""
        return self._per_sample(self.loglik_gain)

    def prediction_accuracy(self) -> dict[str, float]:
        """Eq 7: mean probability the unimodal head of m gives the true label (P^m of eq 9)."""
        return self._per_sample(self.true_prob)

    def unimodal_accuracy(self) -> dict[str, float]:
        return self._per_sample(self.correct)

    def fused_accuracy(self) -> float:
        self.flush()
        return float(self.fused_correct) / max(float(self.count), 1.0)

    def kl(self) -> dict[str, float]:
        """Mean KL(p^f ‖ p^m) between the fused and modality m's predictive distributions."""
        return self._per_sample(self.kl_sum)

    def covariance(self, m: str) -> torch.Tensor:
        self.flush()
        n = float(self.count)
        mean = self.sum_z[m] / n
        return (self.sum_zz[m] - n * torch.outer(mean, mean)) / max(n - 1.0, 1.0)

    def mutual_information(self, shrinkage: float = 1e-3) -> dict[str, float]:
        """Eq 5 for each modality: I(r_m; r_f) from the accumulated joint moments."""
        self.flush()
        if float(self.count) < 2:
            return {m: 0.0 for m in self.modalities}
        return {m: mi_from_covariance(self.covariance(m), self.rep_dims[m], shrinkage) for m in self.modalities}

    def state_dict(self) -> dict:
        return {"tensors": [t.cpu() for t in self._tensors()]}

    def load_state_dict(self, state: dict) -> None:
        for t, s in zip(self._tensors(), state["tensors"]):
            t.copy_(s.to(t.device))


# ------------------------------------------------------------------ eq 9, 10, 1 and the variants


def relative_improvement(history: list[float], t: int, n: int, eps: float = R_EPS) -> float:
    """Eq 9: R(t, n) = (P(t) − P(t−n)) / max(P(t−n), ε), with t − n clipped at epoch 0."""
    past = history[max(t - n, 0)]
    return (history[t] - past) / max(past, eps)


def combine(variant: str, phi: float, r: float, info: float, kl: float) -> tuple[float, float]:
    """(D, W) for one modality under a Table V variant (the CONTRIBUTIONS registry). D = φ·R (eq 10).

    d_x_i: W = D·I (eq 1); d_plus_i: D + I; d_only: D; i_only: I; kl: W = −KL(p^f ‖ p^m)
    (a modality whose prediction is closer to the fused one counts as contributing more).
    """
    if variant not in CONTRIBUTIONS:
        raise ValueError(f"unknown contribution variant {variant!r}; known: {CONTRIBUTIONS.names()}")
    d = phi * r
    return d, CONTRIBUTIONS.get(variant)(d, info, kl)


CONTRIBUTIONS.register("d_x_i")(lambda d, info, kl: d * info)
CONTRIBUTIONS.register("d_plus_i")(lambda d, info, kl: d + info)
CONTRIBUTIONS.register("d_only")(lambda d, info, kl: d)
CONTRIBUTIONS.register("i_only")(lambda d, info, kl: info)
CONTRIBUTIONS.register("kl")(lambda d, info, kl: -kl)


@dataclass
class Contributions:
    """One refresh of the metric, per modality (the data behind the paper's Fig. 3/4)."""

    W: dict[str, float]
    D: dict[str, float]
    I: dict[str, float]
    phi: dict[str, float]
    R: dict[str, float]
    P: dict[str, float]
    acc: dict[str, float]
    kl: dict[str, float]


class ContributionTracker:
    """Turns accumulated statistics into W at each refresh and keeps the P^m history for R."""

    def __init__(self, modalities: list[str], variant: str = "d_x_i", n: int = 5, shrinkage: float = 1e-3):
        if variant not in CONTRIBUTIONS:
            raise ValueError(f"unknown contribution variant {variant!r}; known: {CONTRIBUTIONS.names()}")
        self.modalities = list(modalities)
        self.variant = variant
        self.n = n
        self.shrinkage = shrinkage
        self.history: dict[str, list[float]] = {m: [] for m in self.modalities}  # P^m per epoch

    def compute(self, stats: ContributionStats, end_of_epoch: bool) -> Contributions:
        """W from `stats` (already all-reduced). At the end of an epoch, P^m(t) is appended to
        the history; a mid-epoch refresh (`update_every`) compares the running P^m with the
        history without recording it."""
        phi = stats.phi()
        p_now = stats.prediction_accuracy()
        info = stats.mutual_information(self.shrinkage)  # logged for every variant
        kl = stats.kl()
        r, d, w = {}, {}, {}
        for m in self.modalities:
            hist = self.history[m] + [p_now[m]]
            r[m] = relative_improvement(hist, len(hist) - 1, self.n)
            d[m], w[m] = combine(self.variant, phi[m], r[m], info[m], kl[m])
            if end_of_epoch:
                self.history[m].append(p_now[m])
        return Contributions(W=w, D=d, I=info, phi=phi, R=r, P=p_now, acc=stats.unimodal_accuracy(), kl=kl)

    def state_dict(self) -> dict:
        return {"history": {m: list(v) for m, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {m: list(state["history"][m]) for m in self.modalities}
