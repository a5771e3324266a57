"""The unimodal logits without autograd when nothing in the loss uses them (calray.method.base,
`unimodal_logits_need_grad`): `method.unimodal_weight: 0`, `method.aib: off` and a strategy that only
reads their values. The update is the one with autograd (the skipped backward carried zeros); DDP's
probe then sees the parameters only they reach as unused."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from calray.data.base import build_datasets
from calray.engine.trainer import Trainer
from calray.method.plugins import unimodal_logits_need_grad
from calray.models import build_model
from calray.models.multimodal import batched_sample
from calray.ray.distributed import unused_parameters
from calray.registry import STRATEGIES

VALUE_ONLY = {"cal", "weak", "null", "none", "ogm_ge", "ogm_ge_mix"}  # read the unimodal logits' values only


def method(strategy: str, unimodal_weight: float = 0.0, aib: str = "off"):
    return SimpleNamespace(method=SimpleNamespace(strategy=strategy, unimodal_weight=unimodal_weight, aib=aib))


def test_which_runs_need_the_unimodal_gradients():
    assert VALUE_ONLY < set(STRATEGIES.names())
    for name in STRATEGIES.names():
        assert unimodal_logits_need_grad(method(name)) == (name not in VALUE_ONLY), name
        assert unimodal_logits_need_grad(method(name, unimodal_weight=0.5)), name
        assert unimodal_logits_need_grad(method(name, aib="beta")), name


@pytest.mark.parametrize("strategy,unimodal_weight,needed", [("cal", 0.0, False), ("none", 0.0, False),
                                                             ("cal", 1.0, True)])
def test_the_update_is_the_one_with_autograd(tiny_cfg, strategy, unimodal_weight, needed):
    cfg = tiny_cfg(method={"strategy": strategy, "aib": "off", "unimodal_weight": unimodal_weight})
    trainer = Trainer(cfg)
    assert trainer.raw_model.unimodal_grad is needed
    reference = copy.deepcopy(trainer)
    reference.raw_model.unimodal_grad = True
    inputs, labels = next(iter(trainer.train_loader))
    for t in (trainer, reference):
        for step in range(3):
            t.train_step(inputs, labels, epoch=0, step=step)
    out = trainer.raw_model(inputs)
    assert all(v.requires_grad is needed for v in out.unimodal_logits.values())
    assert out.fused_logits.requires_grad
    for (name, a), b in zip(trainer.raw_model.named_parameters(), reference.raw_model.parameters()):
        assert torch.equal(a, b), name


def test_ddp_probe_sees_heads_only_the_unimodal_logits_reach_as_unused(tiny_cfg):
    cfg = tiny_cfg(method={"strategy": "none", "aib": "off", "unimodal_weight": 0.0},
                   model={"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}},
                          "unimodal_head": "separate"})
    splits = build_datasets(cfg)
    model = build_model(cfg, splits)
    inputs = batched_sample(splits.train)[0]
    assert unused_parameters(model, inputs) == []
    model.unimodal_grad = unimodal_logits_need_grad(cfg)
    assert sorted(unused_parameters(model, inputs)) == sorted(
        f"separate_heads.{m}.{p}" for m in ("audio", "visual") for p in ("weight", "bias"))
