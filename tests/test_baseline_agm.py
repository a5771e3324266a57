"""AGM (calray.method.agm): Shapley mono-modal responses, the coefficient rule, and one step of the
loop scaling each branch's gradient by its coefficient."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.agm import agm_coefficients, agm_scores, shapley_responses
from calray.models.fusion import ConcatFusion, GatedFusion
from tests.baseline_helpers import branch, cli_run, first_batch, sgd_tree, step_delta

AGM = {"strategy": "agm", "unimodal_weight": 0}


def test_two_modality_shapley_of_concat_is_the_sliced_head_plus_half_the_bias():
    """Concat: φ_a = ½(f(a,v) − f(0,v)) + ½(f(a,0) − 0) = W_a·a + b/2 (closed form)."""
    torch.manual_seed(0)
    fusion = ConcatFusion({"a": 3, "v": 2}, 4, None)
    embs = {"a": torch.randn(5, 3), "v": torch.randn(5, 2)}
    full = fusion(embs)[1]
    phi = shapley_responses(fusion, embs, full)
    W, b = fusion.head.weight, fusion.head.bias
    assert torch.allclose(phi["a"], embs["a"] @ W[:, :3].T + b / 2, atol=1e-6)
    assert torch.allclose(phi["v"], embs["v"] @ W[:, 3:].T + b / 2, atol=1e-6)


def test_three_modality_shapley_matches_the_permutation_average():
    """Nonlinear fusion, M = 3: φ_m = mean over the 3! orderings of m's marginal contribution
    (v(∅) = 0), computed by brute force; efficiency Σ_m φ_m = f(all)."""
    torch.manual_seed(1)
    dims = {"a": 3, "b": 4, "c": 2}
    fusion = GatedFusion(dims, 5, 3)
    embs = {m: torch.randn(6, d) for m, d in dims.items()}
    full = fusion(embs)[1]

    def value(S):
        if not S:
            return torch.zeros_like(full)
        return fusion({m: (h if m in S else torch.zeros_like(h)) for m, h in embs.items()})[1]

    phi = shapley_responses(fusion, embs, full)
    for m in dims:
        total = torch.zeros_like(full)
        for order in itertools.permutations(dims):
            before = set(order[:order.index(m)])
            total += value(before | {m}) - value(before)
        assert torch.allclose(phi[m], total / 6, atol=1e-5), m
    assert torch.allclose(sum(phi.values()), full, atol=1e-5)


def test_scores_are_summed_cross_entropies_with_the_probability_floor():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-40.0, 10.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, 0])
    s = agm_scores({"a": logits}, y)
    expected = F.cross_entropy(logits[:2], y[:2], reduction="sum") + (-math.log(1e-8))  # row 3: p < 1e-8
    assert float(s[0]) == pytest.approx(float(expected), rel=1e-9)


def test_coefficients_two_modalities_by_hand():
    """M = 2: r_a = exp(s_v − s_a), target exp(t_v − t_a); c = exp(α·min(target − r, clamp))."""
    s, t, alpha = {"a": 0.5, "v": 1.5}, {"a": 0.9, "v": 1.1}, 0.3
    c = agm_coefficients(s, t, alpha, clamp=7.0)
    ra, ta = math.exp(1.5 - 0.5), math.exp(1.1 - 0.9)
    rv, tv = math.exp(0.5 - 1.5), math.exp(0.9 - 1.1)
    assert c["a"] == pytest.approx(math.exp(alpha * (ta - ra)))
    assert c["v"] == pytest.approx(math.exp(alpha * (tv - rv)))
    assert c["a"] < 1.0 < c["v"]  # audio is further ahead than its running target: slowed down
    capped = agm_coefficients({"a": 3.0, "v": 0.0}, {"a": 0.0, "v": 3.0}, 1.0, clamp=2.0)
    assert capped["a"] == pytest.approx(math.exp(2.0))  # the clamp of r̄ − r


@torch.no_grad()
def concat_scores(model, inputs, y) -> dict[str, float]:
    """s_m of a batch for 2-modality concat fusion, from the closed form φ_m = W_m·h_m + b/2."""
    out = model(inputs)
    W, b = model.fusion.head.weight, model.fusion.head.bias
    d = out.embeddings["audio"].shape[1]
    phi = {"audio": out.embeddings["audio"] @ W[:, :d].T + b / 2, "visual": out.embeddings["visual"] @ W[:, d:].T + b / 2}
    return {m: float(F.cross_entropy(phi[m], y)) for m in phi}


def test_one_step_scales_each_branch_gradient_by_its_coefficient(tiny_cfg):
    """Against plain fused-CE training from the same initial weights and batch: the encoder
    updates are c_m × the plain ones (c_m from the batch by the closed form above, targets 0 at the
    first update), the shared head's update is unchanged; the running target becomes the score."""
    alpha = 2.0
    plain = Trainer(tiny_cfg(**sgd_tree(unimodal_weight=0)))
    agm = Trainer(tiny_cfg(**sgd_tree(**AGM, params={"alpha": alpha})))
    inputs, y = first_batch(plain)
    s = concat_scores(plain.raw_model, inputs, y)
    c = {"audio": math.exp(alpha * (1.0 - math.exp(s["visual"] - s["audio"]))),
         "visual": math.exp(alpha * (1.0 - math.exp(s["audio"] - s["visual"])))}
    assert abs(c["audio"] - c["visual"]) > 0.1
    base, moved = step_delta(plain, inputs, y), step_delta(agm, inputs, y)
    for name, delta in base.items():
        m = branch(name)
        expected = delta * c[m] if m else delta
        assert torch.allclose(moved[name], expected, rtol=1e-4, atol=1e-7), name
    assert agm.strategy.targets == pytest.approx(s, rel=1e-6)
    assert agm.strategy.last_coefficients == pytest.approx(c, rel=1e-6)
    # second update: its target is the first score, and the running target becomes the mean of both
    batches = iter(agm.train_loader)
    next(batches)
    inputs2, y2, *_ = next(batches)
    s2 = concat_scores(agm.raw_model, inputs2, y2)
    agm.train_step(inputs2, y2, epoch=0, step=1)
    r_target = math.exp(s["visual"] - s["audio"])
    assert agm.strategy.last_coefficients["audio"] == pytest.approx(
        math.exp(alpha * (r_target - math.exp(s2["visual"] - s2["audio"]))), rel=1e-6)
    assert agm.strategy.targets == pytest.approx({m: (s[m] + s2[m]) / 2 for m in s}, rel=1e-6)


def test_outside_the_window_the_update_is_plain_fused_ce(tiny_cfg):
    plain = Trainer(tiny_cfg(**sgd_tree(unimodal_weight=0)))
    agm = Trainer(tiny_cfg(**sgd_tree(**AGM, params={"alpha": 0.5, "modulation_starts": 1})))
    inputs, y = first_batch(plain)
    base, moved = step_delta(plain, inputs, y), step_delta(agm, inputs, y)
    assert all(torch.allclose(moved[k], base[k], atol=1e-7) for k in base)
    assert agm.strategy.iteration == 1  # the running target still advances


def test_agm_requires_the_published_loss(tiny_cfg):
    with pytest.raises(ConfigError, match="method.aib.*method.unimodal_weight"):
        Trainer(tiny_cfg(method={"strategy": "agm"}))
    with pytest.raises(Exception, match="alpha"):
        tiny_cfg(method={"strategy": "agm", "aib": "off", "unimodal_weight": 0, "params": {"alpha": -1}})


def test_cli_run_and_resume_state(tiny_cfg, tmp_path):
    cfg = tiny_cfg(name="agm_cli")
    summary = cli_run(cfg, tmp_path, ["method.strategy=agm", "method.aib=off", "method.unimodal_weight=0",
                                      "method.params.alpha=0.2"])
    assert summary["epochs_run"] == 2
    from calray.engine.checkpoint import load_checkpoint

    state = load_checkpoint(cfg.run_dir() / "checkpoints" / "last.pt")["methods"][0]
    assert state["iteration"] == 16 and set(state["targets"]) == {"audio", "visual"}  # 2 epochs × 8 steps
