"""ARL (calray.method.arl): the weights from entropy and logit magnitude, the loss CE_f + γ·Σ CE_m, and
one step of the loop scaling each branch's gradient by (1 + w_m) after the warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.arl import arl_weights
from tests.baseline_helpers import branch, cli_run, first_batch, sgd_tree, step_delta


def reference_weights(out_a: np.ndarray, out_v: np.ndarray, T: float) -> tuple[float, float]:
    """The reference's train_epoch lines for two modalities (main_arl_variance.py), in numpy."""
    calc_a, calc_b = np.abs(out_a).mean(0).sum(), np.abs(out_v).mean(0).sum()
    pa = np.exp(out_a) / np.exp(out_a).sum(1, keepdims=True)
    pv = np.exp(out_v) / np.exp(out_v).sum(1, keepdims=True)
    h_a, h_v = (-pa * np.log(pa + 1e-16)).sum(1).mean(), (-pv * np.log(pv + 1e-16)).sum(1).mean()
    h_a, h_v = max(h_a / (h_a + h_v), 0.3), max(h_v / (h_a + h_v), 0.3)
    a_w, v_w = 1 / h_a, 1 / h_v
    calc_a, calc_b = calc_a / (calc_a + calc_b), calc_b / (calc_a + calc_b)
    a_w, v_w = a_w / (a_w + v_w), v_w / (a_w + v_w)
    z = np.array([calc_b * a_w * T, calc_a * v_w * T])
    e = np.exp(z - z.max())
    return tuple(e / e.sum())


def stats_of(logits: np.ndarray) -> tuple[float, float]:
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return float((-p * np.log(p + 1e-16)).sum(1).mean()), float(np.abs(logits).sum(1).mean())


@pytest.mark.parametrize("T", [1.0, 8.0])
def test_weights_match_the_reference_expression(T):
    rng = np.random.default_rng(0)
    out_a, out_v = rng.normal(0, 3, (7, 5)), rng.normal(0, 0.5, (7, 5))  # a confident, v unsure
    (ha, aa), (hv, av) = stats_of(out_a), stats_of(out_v)
    w = arl_weights({"audio": ha, "visual": hv}, {"audio": aa, "visual": av}, T, 0.3)
    assert (w["audio"], w["visual"]) == pytest.approx(reference_weights(out_a, out_v, T), rel=1e-9)
    same_magnitude = arl_weights({"audio": ha, "visual": hv}, {"audio": 1.0, "visual": 1.0}, T, 0.3)
    assert same_magnitude["audio"] > same_magnitude["visual"]  # at equal magnitude: the low-entropy one


def test_entropy_floor_caps_the_inverse_variance():
    w = arl_weights({"a": 0.01, "b": 1.0}, {"a": 1.0, "b": 1.0}, 1.0, 0.3)
    # Ĥ = (0.3, 0.99): ũ = (1/0.3, 1/0.99) normalised; s = ũ·(1 − 0.5)
    u = np.array([1 / 0.3, 1 / (1.0 / 1.01)])
    s = u / u.sum() * 0.5
    assert [w["a"], w["b"]] == pytest.approx(list(np.exp(s) / np.exp(s).sum()), rel=1e-9)


def test_one_step_after_warmup_scales_branches_by_one_plus_w(tiny_cfg):
    """Against `none` with unimodal_weight γ (the same loss CE_f + γ·Σ CE_m) from the same weights and
    batch: each encoder's update is (1 + w_m) × the plain one, w_m from the batch's unimodal logits."""
    gamma, T = 3.0, 8.0
    plain = Trainer(tiny_cfg(**sgd_tree(unimodal_weight=gamma)))
    arl = Trainer(tiny_cfg(**sgd_tree(strategy="arl", params={"gamma": gamma, "T": T, "start": 0})))
    inputs, y = first_batch(plain)
    with torch.no_grad():
        out = plain.raw_model(inputs)
    w = reference_weights(out.unimodal_logits["audio"].double().numpy(), out.unimodal_logits["visual"].double().numpy(), T)
    w = {"audio": w[0], "visual": w[1]}
    base = step_delta(plain, inputs, y, epoch=1)
    moved = step_delta(arl, inputs, y, epoch=1)
    for name, delta in base.items():
        m = branch(name)
        expected = delta * (1.0 + w[m]) if m else delta
        assert torch.allclose(moved[name], expected, rtol=1e-4, atol=1e-7), name
    assert arl.strategy.last_weights == pytest.approx(w, rel=1e-6)


def test_warmup_is_plain_joint_training_with_gamma_one(tiny_cfg):
    plain = Trainer(tiny_cfg(**sgd_tree(unimodal_weight=1.0)))
    arl = Trainer(tiny_cfg(**sgd_tree(strategy="arl", params={"gamma": 4.0, "start": 5})))
    inputs, y = first_batch(plain)
    base, moved = step_delta(plain, inputs, y, epoch=5), step_delta(arl, inputs, y, epoch=5)
    assert all(torch.allclose(moved[k], base[k], atol=1e-7) for k in base)


def test_arl_requires_its_loss(tiny_cfg):
    with pytest.raises(ConfigError, match="method.aib"):
        Trainer(tiny_cfg(method={"strategy": "arl"}))
    with pytest.raises(ConfigError, match="method.unimodal_weight"):
        Trainer(tiny_cfg(method={"strategy": "arl", "aib": "off", "unimodal_weight": 0.5}))


def test_cli_run_logs_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg(name="arl_cli")
    cli_run(cfg, tmp_path, ["method.strategy=arl", "method.aib=off", "method.params.start=0"])
    import json

    rows = [json.loads(r) for r in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["arl_w_audio"] == 0.0  # epoch 0 ≤ start: warm-up
    assert rows[1]["arl_w_audio"] + rows[1]["arl_w_visual"] == pytest.approx(1.0)
