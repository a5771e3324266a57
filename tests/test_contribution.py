"""The contribution metric (paper eq 1–10, Table V) against independent computations.

References used here: closed-form Gaussian MI from a *population* covariance (numpy), a
hand-written log-softmax in plain Python (`math`), numpy's sample covariance, and R of eq 9
written out by hand over a made-up accuracy history.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from calray.method.contribution import (
    R_EPS,
    ContributionStats,
    ContributionTracker,
    combine,
    gaussian_mi,
    mi_from_covariance,
    relative_improvement,
)
from calray.models.fusion import ConcatFusion
from calray.models.multimodal import MultimodalModel

# ------------------------------------------------------------------ eq 3–6: Gaussian MI




def closed_form_mi(cov: np.ndarray, dx: int) -> float:
    """½·log(det Σx · det Σy / det Σ) from a known population covariance (numpy, float64)."""
    return 0.5 * (np.linalg.slogdet(cov[:dx, :dx])[1] + np.linalg.slogdet(cov[dx:, dx:])[1]
                  - np.linalg.slogdet(cov)[1])


@pytest.mark.parametrize("rho", [0.3, 0.8, -0.6])
def test_gaussian_mi_bivariate_matches_closed_form(rho):
    rng = np.random.default_rng(1)
    n = 40_000
    cov = np.array([[1.0, rho], [rho, 1.0]])
    z = rng.multivariate_normal([0.0, 0.0], cov, size=n)
    expected = -0.5 * math.log(1.0 - rho ** 2)
    got = gaussian_mi(torch.from_numpy(z[:, :1]), torch.from_numpy(z[:, 1:]))
    # sampling s.e. of the plug-in estimate is about |ρ|/√N ≈ 0.004; shrinkage bias < 0.002
    assert got == pytest.approx(expected, abs=0.02)


def test_gaussian_mi_multivariate_matches_closed_form():
    rng = np.random.default_rng(2)
    dx, dy, n = 3, 2, 60_000
    a = rng.normal(size=(dx + dy, dx + dy))
    cov = a @ a.T + 0.5 * np.eye(dx + dy)
    expected = closed_form_mi(cov, dx)
    assert expected > 0.1
    z = rng.multivariate_normal(np.zeros(dx + dy), cov, size=n) + 5.0  # non-zero mean is removed
    got = gaussian_mi(torch.from_numpy(z[:, :dx]), torch.from_numpy(z[:, dx:]))
    assert got == pytest.approx(expected, abs=0.03)
    # exactly the closed form when given the population covariance and no shrinkage
    assert mi_from_covariance(torch.from_numpy(cov), dx, shrinkage=0.0) == pytest.approx(expected, rel=1e-10)


def test_gaussian_mi_independent_is_near_zero():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20_000, 3, generator=g, dtype=torch.float64)
    mi = gaussian_mi(x, y)
    # plug-in bias is about dx·dy/(2N) = 3e-4
    assert 0.0 <= mi < 5e-3


def test_gaussian_mi_finite_and_non_negative_when_n_below_d():
    g = torch.Generator().manual_seed(4)
    for n in (2, 5, 9):
        x = torch.randn(n, 10, generator=g)
        y = torch.randn(n, 8, generator=g)
        for s in (1e-3, 1e-2, 0.5):
            mi = gaussian_mi(x, y, shrinkage=s)
            assert math.isfinite(mi) and mi >= 0.0
    # y a copy of x: still finite thanks to the shrinkage, and larger than for independent data
    x = torch.randn(6, 10, generator=g)
    assert math.isfinite(gaussian_mi(x, x.clone())) and gaussian_mi(x, x.clone()) > gaussian_mi(x, y[:6, :])


def test_gaussian_mi_invariant_to_rescaling_each_side():
    """MI is invariant to invertible affine maps of X (and of Y); with the default shrinkage the
    estimate must be too, even when one side (e.g. a weak modality's logits) is tiny."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5000, 6, generator=g, dtype=torch.float64)
    y = 0.8 * x + 0.6 * torch.randn(5000, 6, generator=g, dtype=torch.float64)
    base = gaussian_mi(x, y)
    assert base == pytest.approx(-0.5 * 6 * math.log(1 - 0.64), abs=0.1)
    for c in (1e-3, 0.05, 30.0):
        assert gaussian_mi(c * x, y) == pytest.approx(base, rel=1e-6)
        assert gaussian_mi(x, c * y + 7.0) == pytest.approx(base, rel=1e-6)
    # a general invertible linear map of X, without shrinkage: exact invariance
    a = torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    assert gaussian_mi(x @ a, y, shrinkage=0.0) == pytest.approx(gaussian_mi(x, y, shrinkage=0.0), rel=1e-8)


# ------------------------------------------------------------------ eq 7, 8 and the KL variant


def log_softmax_py(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def test_stats_match_hand_computation_on_tiny_tensors():
    labels = [0, 2, 1]
    fused = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 3.0, 0.0]]
    uni = {"a": [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.5, 0.4, 0.0]],
           "b": [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]}
    abl = {"a": [[0.0, 0.5, -1.0], [0.1, 0.2, -1.0], [1.0, 0.0, 0.0]],   # fused without a
           "b": [[2.0, -0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 2.5, 0.0]]}  # fused without b
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    stats = ContributionStats(["a", "b"], {"a": 3, "b": 3}, 3)
    stats.update(torch.tensor(labels), t(fused), {k: t(v) for k, v in uni.items()},
                 {k: t(v) for k, v in abl.items()}, {k: t(v) for k, v in uni.items()}, t(fused))

    n = len(labels)
    lf = [log_softmax_py(r) for r in fused]
    phi, p_true, acc, kl = {}, {}, {}, {}
    for m in ("a", "b"):
        la = [log_softmax_py(r) for r in abl[m]]
        lm = [log_softmax_py(r) for r in uni[m]]
        phi[m] = sum(lf[i][y] - la[i][y] for i, y in enumerate(labels)) / n
        p_true[m] = sum(math.exp(lm[i][y]) for i, y in enumerate(labels)) / n
        acc[m] = sum(int(max(range(3), key=lambda c: uni[m][i][c]) == y) for i, y in enumerate(labels)) / n
        kl[m] = sum(sum(math.exp(lf[i][c]) * (lf[i][c] - lm[i][c]) for c in range(3)) for i in range(n)) / n
    fused_acc = sum(int(max(range(3), key=lambda c: fused[i][c]) == y) for i, y in enumerate(labels)) / n

    for m in ("a", "b"):
        assert stats.phi()[m] == pytest.approx(phi[m], abs=1e-6)
        assert stats.prediction_accuracy()[m] == pytest.approx(p_true[m], abs=1e-6)
        assert stats.unimodal_accuracy()[m] == pytest.approx(acc[m])
        assert stats.kl()[m] == pytest.approx(kl[m], abs=1e-6)
    assert stats.fused_accuracy() == pytest.approx(fused_acc)
    assert phi["a"] > 0 and phi["b"] < 0  # the made-up case has one helpful and one harmful modality


class Identity(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.out_dim = d

    def forward(self, x):
        return x


def test_phi_zero_for_ignored_modality_and_positive_for_decisive_one():
    """Concat fusion whose weight slice for `visual` is zero: the fusion ignores visual, so
    zero-filling it changes nothing (φ = 0); `audio` carries the label, so φ_audio > 0."""
    torch.manual_seed(0)
    k, n = 4, 512
    fusion = ConcatFusion({"audio": k, "visual": k}, k, None)
    with torch.no_grad():
        fusion.head.weight.zero_()
        fusion.head.weight[:, :k] = 4.0 * torch.eye(k)  # audio slice: one-hot → logit
        fusion.head.bias.zero_()
    model = MultimodalModel({"audio": Identity(k), "visual": Identity(k)}, fusion)
    y = torch.randint(0, k, (n,))
    inputs = {"audio": nn.functional.one_hot(y, k).float() + 0.1 * torch.randn(n, k),
              "visual": torch.randn(n, k)}
    for ablation in ("zero", "mean"):
        model.train()
        out = model(inputs, ablation=ablation)
        stats = ContributionStats(["audio", "visual"], {"audio": k, "visual": k}, k)
        stats.update(y, out.fused_logits, out.unimodal_logits, out.ablated_logits, out.unimodal_logits,
                     out.fused_logits)
        phi = stats.phi()
        assert phi["visual"] == pytest.approx(0.0, abs=1e-9)
        assert phi["audio"] > 1.0
        # φ_audio by hand: log p(y|all) − log p(y|all without audio)
        removed = torch.zeros(n, k) if ablation == "zero" else inputs["audio"].mean(0).expand(n, k)
        logits_without = removed @ fusion.head.weight[:, :k].T.detach()
        lp_all = torch.log_softmax(out.fused_logits.detach().double(), 1).gather(1, y[:, None])
        lp_wo = torch.log_softmax(logits_without.double(), 1).gather(1, y[:, None])
        assert phi["audio"] == pytest.approx(float((lp_all - lp_wo).mean()), abs=1e-5)
        # the fused distribution ignores visual: p^f equals p^audio; KL(p^f‖p^audio) = 0
        assert stats.kl()["audio"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])  # M = 2 reuses unimodal logits; M = 3 does not
def test_zero_ablated_logits_match_hand_computed_concat_head(mods):
    torch.manual_seed(1)
    k, n, c = 3, 10, 4
    fusion = ConcatFusion({m: k for m in mods}, c, None)
    model = MultimodalModel({m: Identity(k) for m in mods}, fusion).train()
    x = {m: torch.randn(n, k) for m in mods}
    out = model(x, ablation="zero")
    w, b = fusion.head.weight.detach(), fusion.head.bias.detach()
    for i, m in enumerate(mods):
        want = b + sum(x[o] @ w[:, j * k:(j + 1) * k].T for j, o in enumerate(mods) if o != m)
        assert torch.allclose(out.ablated_logits[m], want, atol=1e-5), m
        assert not out.ablated_logits[m].requires_grad


def test_mean_ablation_uses_the_running_mean_of_embeddings():
    """After a few training forwards (fewer than 1/momentum) the running mean is the exact mean
    of the batch means — not biased toward its zero initialisation."""
    k = 3
    fusion = ConcatFusion({"a": k, "b": k}, 2, None)
    model = MultimodalModel({"a": Identity(k), "b": Identity(k)}, fusion).train()
    g = torch.Generator().manual_seed(0)
    batch_means = []
    for _ in range(4):
        x = {"a": torch.randn(8, k, generator=g) + 3.0, "b": torch.randn(8, k, generator=g)}
        batch_means.append(x["a"].mean(0))
        out = model(x, ablation="mean")
    expected = torch.stack(batch_means).mean(0)
    assert torch.allclose(model.embedding_mean("a"), expected, atol=1e-5)
    # the mean-ablated fused logits are the fusion with a's embedding replaced by that mean
    with torch.no_grad():
        ref = fusion({"a": expected.expand(8, k), "b": x["b"]})[1]
    assert torch.allclose(out.ablated_logits["a"], ref, atol=1e-5)
    # evaluation forwards do not move it
    model.eval()
    model(x)
    assert torch.allclose(model.embedding_mean("a"), expected, atol=1e-5)


# ------------------------------------------------------------------ merge / covariance / all_reduce


def random_batch(g, n, k=3, dims=(4, 2), fused_dim=5):
    labels = torch.randint(0, k, (n,), generator=g)
    fused = torch.randn(n, k, generator=g)
    uni = {"a": torch.randn(n, k, generator=g), "b": torch.randn(n, k, generator=g)}
    abl = {"a": torch.randn(n, k, generator=g), "b": torch.randn(n, k, generator=g)}
    reps = {"a": torch.randn(n, dims[0], generator=g), "b": torch.randn(n, dims[1], generator=g)}
    fused_rep = torch.randn(n, fused_dim, generator=g)
    fused_rep[:, :dims[1]] += reps["b"]  # some dependence so the MIs are not ~0
    fused_rep[:, -1] += reps["a"][:, 0]
    return labels, fused, uni, abl, reps, fused_rep


def new_stats(dims=(4, 2)):
    return ContributionStats(["a", "b"], {"a": dims[0], "b": dims[1]}, 5)


# the sums built from per-sample log-probabilities (loglik_gain, true_prob, kl_sum: positions in
# `_tensors()`) come from a float32 log-softmax when the logits are float32, so two orders of the same
# samples agree to float32's precision; float64 logits keep every sum exact to float64's
LOGP_SUMS = (2, 3, 5)


def assert_same_sums(got, want, float32_logits=True):
    for i, (a, b) in enumerate(zip(got._tensors(), want._tensors())):
        assert a.dtype == torch.float64
        tol = dict(rtol=1e-6, atol=1e-6) if float32_logits and i in LOGP_SUMS else dict(rtol=1e-12, atol=1e-10)
        assert torch.allclose(a, b, **tol), i


def as_float64(batch):
    return tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() else
                 {k: v.double() for k, v in x.items()} if isinstance(x, dict) else x for x in batch)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dims", [(4, 2), (3, 3)])  # unequal sizes; equal sizes (the batched path)
def test_merge_of_half_batches_equals_full_batch(dims, dtype):
    g = torch.Generator().manual_seed(7)
    batch = random_batch(g, 64, dims=dims)
    if dtype == "float64":
        batch = as_float64(batch)
    full = new_stats(dims)
    full.update(*batch)
    first, second = new_stats(dims), new_stats(dims)
    first.update(*[x[:30] if torch.is_tensor(x) else {k: v[:30] for k, v in x.items()} for x in batch])
    second.update(*[x[30:] if torch.is_tensor(x) else {k: v[30:] for k, v in x.items()} for x in batch])
    merged = first.merge(second)
    assert_same_sums(merged, full, float32_logits=dtype == "float32")
    rel = 1e-6 if dtype == "float32" else 1e-9
    for name in ("phi", "prediction_accuracy", "unimodal_accuracy", "kl", "mutual_information"):
        got, want = getattr(merged, name)(), getattr(full, name)()
        for m in ("a", "b"):
            assert got[m] == pytest.approx(want[m], rel=rel, abs=1e-12), name
    assert merged.fused_accuracy() == pytest.approx(full.fused_accuracy())
    assert float(merged.count) == 64


@pytest.mark.parametrize("flush_every", [2, 5, 100])
def test_buffered_updates_equal_immediate_updates(flush_every):
    """flush_every=k (the trainer's amortised path) gives the sums of k=1, whatever the remainder."""
    g = torch.Generator().manual_seed(9)
    batches = [random_batch(g, n) for n in (16, 16, 9, 16, 16, 16, 3)]
    now = new_stats()
    buffered = ContributionStats(["a", "b"], {"a": 4, "b": 2}, 5, flush_every=flush_every)
    for batch in batches:
        now.update(*batch)
        buffered.update(*batch)
    assert len(buffered._pending) == len(batches) % flush_every
    buffered.flush()
    assert_same_sums(buffered, now)
    assert float(buffered.count) == sum(len(b[0]) for b in batches)


@pytest.mark.parametrize("dims", [(4, 2), (3, 3)])
def test_accumulated_covariance_and_mi_match_numpy(dims):
    g = torch.Generator().manual_seed(8)
    labels, fused, uni, abl, reps, fused_rep = random_batch(g, 300, dims=dims)
    stats = new_stats(dims)
    for sl in (slice(0, 100), slice(100, 300)):  # two updates, as over two steps
        stats.update(labels[sl], fused[sl], {k: v[sl] for k, v in uni.items()},
                     {k: v[sl] for k, v in abl.items()}, {k: v[sl] for k, v in reps.items()}, fused_rep[sl])
    for m in ("a", "b"):
        z = np.concatenate([reps[m].double().numpy(), fused_rep.double().numpy()], axis=1)
        ref_cov = np.cov(z, rowvar=False)
        assert np.allclose(stats.covariance(m).numpy(), ref_cov, atol=1e-10)
        # with the per-block shrinkage written out by hand
        s, dx = 1e-3, reps[m].shape[1]
        target = np.diag(np.r_[np.full(dx, np.trace(ref_cov[:dx, :dx]) / dx),
                               np.full(5, np.trace(ref_cov[dx:, dx:]) / 5)])
        expected = closed_form_mi((1 - s) * ref_cov + s * target, dx)
        assert stats.mutual_information(s)[m] == pytest.approx(expected, rel=1e-8)
    assert stats.mutual_information()["a"] > 0.05 and stats.mutual_information()["b"] > 0.05


def test_all_reduce_is_a_noop_without_distributed():
    g = torch.Generator().manual_seed(9)
    stats = new_stats()
    stats.update(*random_batch(g, 16))
    before = [t.clone() for t in stats._tensors()]
    assert stats.all_reduce() is stats
    for a, b in zip(before, stats._tensors()):
        assert torch.equal(a, b)


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(10)
    stats = new_stats()
    stats.update(*random_batch(g, 16))
    other = new_stats()
    other.load_state_dict(stats.state_dict())
    for a, b in zip(stats._tensors(), other._tensors()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ eq 9, 10, 1 and Table V


def test_relative_improvement_hand_calculation():
    hist = [0.20, 0.30, 0.50, 0.60, 0.65, 0.66]
    n = 3
    expected = [
        0.0,                       # t=0: t−n clipped to 0, P(0) vs itself
        (0.30 - 0.20) / 0.20,      # t=1 < n: compared with epoch 0
        (0.50 - 0.20) / 0.20,      # t=2 < n
        (0.60 - 0.20) / 0.20,      # t=3 = n: epoch 0
        (0.65 - 0.30) / 0.30,      # t=4: epoch 1
        (0.66 - 0.50) / 0.50,      # t=5: epoch 2 — R shrinks as P saturates
    ]
    for t, want in enumerate(expected):
        assert relative_improvement(hist, t, n) == pytest.approx(want, rel=1e-12)
    assert relative_improvement(hist, 5, 1) == pytest.approx((0.66 - 0.65) / 0.65)


def test_relative_improvement_epsilon():
    assert R_EPS == 1e-8
    assert relative_improvement([0.0, 0.1], 1, 5) == pytest.approx(0.1 / 1e-8)
    assert relative_improvement([1e-12, 0.5], 1, 1) == pytest.approx((0.5 - 1e-12) / 1e-8)
    assert relative_improvement([0.0, 0.0], 1, 1) == 0.0
    assert relative_improvement([0.5, 0.25], 1, 1, eps=0.9) == pytest.approx(-0.25 / 0.9)


def test_combine_variants():
    phi, r, info, kl = 0.7, -0.2, 1.5, 0.4
    assert combine("d_x_i", phi, r, info, kl) == pytest.approx((phi * r, phi * r * info))
    assert combine("d_plus_i", phi, r, info, kl) == pytest.approx((phi * r, phi * r + info))
    assert combine("d_only", phi, r, info, kl) == pytest.approx((phi * r, phi * r))
    assert combine("i_only", phi, r, info, kl) == pytest.approx((phi * r, info))
    assert combine("kl", phi, r, info, kl) == pytest.approx((phi * r, -kl))
    with pytest.raises(ValueError):
        combine("bogus", phi, r, info, kl)
    with pytest.raises(ValueError):
        ContributionTracker(["a"], variant="bogus")


class FakeStats:
    """Duck-typed stats with chosen per-modality values (what the tracker reads)."""

    def __init__(self, phi, p, info, kl):
        self._phi, self._p, self._info, self._kl = phi, p, info, kl

    def phi(self):
        return dict(self._phi)

    def prediction_accuracy(self):
        return dict(self._p)

    def mutual_information(self, shrinkage=1e-3):
        return dict(self._info)

    def kl(self):
        return dict(self._kl)

    def unimodal_accuracy(self):
        return dict(self._p)


@pytest.mark.parametrize("variant", ["d_x_i", "d_plus_i", "d_only", "i_only", "kl"])
def test_tracker_over_epochs_matches_hand_calculation(variant):
    p_hist = {"a": [0.3, 0.6, 0.8, 0.85], "b": [0.2, 0.22, 0.3, 0.4]}
    phi = {"a": 0.9, "b": 0.1}
    info = {"a": 2.0, "b": 0.5}
    kl = {"a": 0.05, "b": 0.7}
    n = 2
    tr = ContributionTracker(["a", "b"], variant=variant, n=n)
    for t in range(4):
        # a mid-epoch refresh compares with the history but does not record its P
        mid = tr.compute(FakeStats(phi, {m: 0.5 for m in "ab"}, info, kl), end_of_epoch=False)
        assert len(tr.history["a"]) == t
        past = {m: p_hist[m][max(t - n, 0)] for m in "ab"}
        if t > 0:
            assert mid.R["a"] == pytest.approx((0.5 - past["a"]) / past["a"])
        c = tr.compute(FakeStats(phi, {m: p_hist[m][t] for m in "ab"}, info, kl), end_of_epoch=True)
        for m in "ab":
            r = (p_hist[m][t] - past[m]) / past[m]
            d = phi[m] * r
            w = {"d_x_i": d * info[m], "d_plus_i": d + info[m], "d_only": d, "i_only": info[m], "kl": -kl[m]}[variant]
            assert c.R[m] == pytest.approx(r, abs=1e-12)
            assert c.D[m] == pytest.approx(d, abs=1e-12)
            assert c.W[m] == pytest.approx(w, abs=1e-12)
            assert c.I[m] == info[m] and c.phi[m] == phi[m] and c.P[m] == p_hist[m][t]
        if t == 0:
            assert c.R == {"a": 0.0, "b": 0.0}
    assert tr.history == p_hist
    # state round trip
    tr2 = ContributionTracker(["a", "b"], variant=variant, n=n)
    tr2.load_state_dict(tr.state_dict())
    assert tr2.history == p_hist


def test_a_window_mixing_logit_and_representation_updates_is_refused():
    g = torch.Generator().manual_seed(3)
    labels, fused, uni, abl, reps, fused_rep = random_batch(g, 8, dims=(3, 3))
    stats = ContributionStats(["a", "b"], {"a": 3, "b": 3}, 5, flush_every=10)
    stats.update(labels, fused, uni, abl, reps, fused_rep)
    stats.update(labels, fused, uni, abl)  # the pair would silently switch to the logits
    with pytest.raises(ValueError, match="with and without reps"):
        stats.flush()



def test_no_reps_means_the_logits_are_the_measured_pair():
    g = torch.Generator().manual_seed(4)
    labels, fused, uni, abl, _, _ = random_batch(g, 40)
    implicit, explicit = (ContributionStats(["a", "b"], {"a": 3, "b": 3}, 3, flush_every=2) for _ in range(2))
    for sl in (slice(0, 25), slice(25, 40)):
        part = lambda d: {k: v[sl] for k, v in d.items()}  # noqa: E731
        implicit.update(labels[sl], fused[sl], part(uni), part(abl))
        explicit.update(labels[sl], fused[sl], part(uni), part(abl), part(uni), fused[sl])
    for a, b in zip(implicit._tensors(), explicit._tensors()):
        assert torch.equal(a, b)
