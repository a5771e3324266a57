"""Gradient-Blending (calray.method.gblending): the weight rule w ∝ G/ΔO², the per-head weighted loss,
and the estimates at super-epoch boundaries from the loop's train/val evaluation (per-head losses)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.gblending import blend_weights
from tests.baseline_helpers import cli_run, first_batch, sgd_tree

GB = {"strategy": "gblending"}


def test_blend_weights_by_hand():
    prev = {"fused": (1.0, 1.2), "a": (1.5, 1.6), "v": (1.4, 1.5)}
    now = {"fused": (0.5, 0.9), "a": (1.0, 1.4), "v": (1.0, 1.6)}
    # G: fused 0.3, a 0.2, v −0.1 (→ 0); ΔO: fused 0.4 − 0.2 = 0.2, a 0.4 − 0.1 = 0.3
    raw = {"fused": 0.3 / 0.04, "a": 0.2 / 0.09, "v": 0.0}
    w = blend_weights(prev, now, 1e-8)
    z = sum(raw.values())
    assert w == pytest.approx({h: r / z for h, r in raw.items()})
    assert blend_weights(prev, {h: (t, v + 1.0) for h, (t, v) in prev.items()}, 1e-8) is None  # no head improved
    flat = blend_weights({"x": (1.0, 1.0), "y": (1.0, 1.0)}, {"x": (0.9, 0.9), "y": (0.5, 0.9)}, 1e-4)
    assert flat["x"] == pytest.approx((0.1 / 1e-4) / (0.1 / 1e-4 + 0.1 / 0.16))  # ΔO² floored at eps


def test_loss_is_the_weighted_sum_of_head_losses(tiny_cfg):
    trainer = Trainer(tiny_cfg(**sgd_tree(**GB)))
    trainer.strategy.weights = {"fused": 0.5, "audio": 0.3, "visual": 0.2}
    inputs, y = first_batch(trainer)
    with torch.no_grad():
        out = trainer.raw_model(inputs)
    expected = (0.5 * F.cross_entropy(out.fused_logits, y) + 0.3 * F.cross_entropy(out.unimodal_logits["audio"], y)
                + 0.2 * F.cross_entropy(out.unimodal_logits["visual"], y))
    assert float(trainer.train_step(inputs, y, epoch=0, step=0)) == pytest.approx(float(expected), rel=1e-6)


def test_estimates_at_super_epoch_boundaries_from_train_and_val_head_losses(tiny_cfg):
    """super_epoch 2: estimates at the end of epochs 0 (anchor only) and 2 (weights); the loop's
    evaluate() now reports each head's loss, and evaluate('train') covers the training split once."""
    trainer = Trainer(tiny_cfg(**sgd_tree(**GB, params={"super_epoch": 2})))
    gb = trainer.strategy
    calls = []

    def evaluate(split):
        calls.append(split)
        return trainer.evaluate_split(split)

    uniform = dict(gb.weights)
    assert uniform == pytest.approx({"fused": 1 / 3, "audio": 1 / 3, "visual": 1 / 3})
    gb.on_epoch_end(trainer.raw_model, 0, evaluate)
    assert calls == ["train", "val"] and gb.weights == uniform
    first = dict(gb.anchor)
    train0 = trainer.evaluate_split("train")
    assert train0["n"] == 256 and first["audio"][0] == pytest.approx(train0["loss_audio"])
    for _ in range(3):  # move the model so the losses change
        trainer.train_epoch(0)
    gb.on_epoch_end(trainer.raw_model, 1, evaluate)
    assert calls == ["train", "val"]  # not a boundary
    gb.on_epoch_end(trainer.raw_model, 2, evaluate)
    train, val = trainer.evaluate_split("train"), trainer.evaluate_split("val")
    now = {"fused": (train["loss"], val["loss"]), "audio": (train["loss_audio"], val["loss_audio"]),
           "visual": (train["loss_visual"], val["loss_visual"])}
    expected = blend_weights(first, now, 1e-8)
    assert expected is not None and gb.weights == pytest.approx(expected)
    assert gb.weights != pytest.approx(uniform)


def test_per_head_eval_loss_is_the_unimodal_cross_entropy(tiny_cfg):
    trainer = Trainer(tiny_cfg(**sgd_tree(**GB)))
    val = trainer.evaluate_split("val")
    ce, n = 0.0, 0
    with torch.no_grad():
        trainer.raw_model.eval()
        for inputs, y in trainer.val_loader:
            ce += float(F.cross_entropy(trainer.raw_model(inputs).unimodal_logits["visual"], y, reduction="sum"))
            n += len(y)
    assert val["loss_visual"] == pytest.approx(ce / n, rel=1e-6)


def test_gblending_refuses_other_losses(tiny_cfg):
    with pytest.raises(ConfigError, match="method.aib"):
        Trainer(tiny_cfg(method={"strategy": "gblending"}))
    with pytest.raises(ConfigError, match="method.unimodal_weight"):
        Trainer(tiny_cfg(method={"strategy": "gblending", "aib": "off", "unimodal_weight": 0}))


def test_cli_run_logs_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg(name="gb_cli", optim={"epochs": 3})
    cli_run(cfg, tmp_path, ["method.strategy=gblending", "method.aib=off", "method.params.super_epoch=1"])
    rows = [json.loads(r) for r in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["gblending_w_fused"] == pytest.approx(1 / 3)
    assert sum(rows[-1][f"gblending_w_{h}"] for h in ("fused", "audio", "visual")) == pytest.approx(1.0)
    assert "val_loss_audio" in rows[-1]
