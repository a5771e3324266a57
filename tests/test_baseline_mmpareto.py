"""MMPareto (`method.strategy: mmpareto`, calray/method/mmpareto.py): the 2-task min-norm weight against a
numerical minimisation; one Trainer.train_step against an independent re-implementation of the reference's
loop (one backward per loss, as code/MMPareto.py does, min-norm weight by scipy); gradient accumulation;
config errors; the CLI. The 2-worker Ray Train equivalence is in tests/test_baselines_t1b_ray.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from calray.config import load_config, save_config
from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.mmpareto import min_norm_weight, pareto_weights
from calray.train import main as train_main

LR = 0.1


def pareto_cfg(tiny_cfg, **optim):
    return tiny_cfg(model={"encoders": {"audio": {"name": "mlp", "hidden": [16]}, "visual": {"name": "mlp", "hidden": [16]}},
                           "unimodal_head": "separate"},
                    method={"strategy": "mmpareto", "aib": "off", "unimodal_weight": 1.0},
                    optim={"name": "sgd", "lr": LR, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, **optim})


def numeric_c(a: np.ndarray, b: np.ndarray) -> float:
    return minimize_scalar(lambda c: float(np.sum((c * a + (1 - c) * b) ** 2)), bounds=(0, 1), method="bounded",
                           options={"xatol": 1e-12}).x


def test_min_norm_weight_is_the_minimiser_of_the_convex_combination():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(size=7), rng.normal(size=7)
        b -= 1.5 * (a @ b > 0) * (a @ b) / (a @ a) * a  # make most pairs conflict
        c = min_norm_weight(a @ a, a @ b, b @ b)
        if 0.001 < c < 0.999:
            assert c == pytest.approx(numeric_c(a, b), abs=1e-6)
    a = np.array([1.0, 0.0])
    assert min_norm_weight(a @ a, a @ (2 * a), 4.0) == 0.999  # g2 beyond g1: the solver's end points
    assert min_norm_weight(4.0, a @ (2 * a), a @ a) == 0.001
    k_mm, k_u, cos = pareto_weights(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert (k_mm, k_u) == (0.5, 0.5) and cos == pytest.approx(2 ** -0.5)
    k_mm, k_u, cos = pareto_weights(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0]))
    assert cos < 0 and k_mm == pytest.approx(numeric_c(np.array([1.0, 0.0]), np.array([-1.0, 2.0])), abs=1e-6)
    assert k_mm + k_u == pytest.approx(1.0)


def reference_gradients(model, inputs, y, gamma=1.5):
    """code/MMPareto.py's train_epoch, re-written: a backward per loss, cosine over the encoder's
    concatenated gradients, min-norm weight (here by numerical minimisation), per-tensor rescaling."""
    out = model(inputs)
    losses = {"both": F.cross_entropy(out.fused_logits, y),
              **{m: F.cross_entropy(out.unimodal_logits[m], y) for m in model.modalities}}
    params = dict(model.named_parameters())
    grads = {}
    for name, loss in [*losses.items(), ("total", sum(losses.values()))]:
        model.zero_grad()
        loss.backward(retain_graph=True)
        grads[name] = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    result, branches = dict(grads["total"]), {}
    for m in model.modalities:
        names = [n for n in params if n.startswith(f"encoders.{m}.")]
        a = torch.cat([grads["both"][n].flatten() for n in names]).double().numpy()
        b = torch.cat([grads[m][n].flatten() for n in names]).double().numpy()
        cos = a @ b / np.sqrt((a @ a) * (b @ b))
        c = 0.5 if cos > 0 else numeric_c(a, b)
        branches[m] = cos > 0
        for n in names:
            new = 2 * c * grads["both"][n] + 2 * (1 - c) * grads[m][n]
            diff = grads["total"][n].norm() / new.norm()
            result[n] = diff * new * gamma if diff > 1 else new * gamma
    model.zero_grad()
    return result, branches


def test_a_train_step_applies_the_reference_rule(tiny_cfg):
    trainer = Trainer(pareto_cfg(tiny_cfg))
    seen = set()
    for step, (inputs, y) in zip(range(6), trainer.train_loader):
        before = copy.deepcopy(trainer.raw_model)
        expected, branches = reference_gradients(copy.deepcopy(trainer.raw_model), inputs, y)
        seen.update(branches.values())
        trainer.train_step(inputs, y, epoch=0, step=step)
        for name, p in trainer.raw_model.named_parameters():
            applied = (dict(before.named_parameters())[name] - p).detach() / LR  # SGD: Δθ = −lr·g
            assert torch.allclose(applied, expected[name], rtol=1e-3, atol=1e-6), (step, name)
    assert seen == {True, False}  # both the agreeing (½, ½) and the conflicting (Pareto) branch ran
    stats = trainer.strategy.on_epoch_end(trainer.raw_model, 0, None)
    assert 0.0 < stats["mmpareto_conflict_audio"] + stats["mmpareto_conflict_visual"] < 2.0


def test_gradient_accumulation_combines_the_accumulated_gradients(tiny_cfg):
    """2 micro-batches of b with grad_accum 2 = 1 batch of 2b: the Pareto weights come from the summed
    gradients, not per micro-batch (what DDP's all-reduce relies on too)."""
    one = Trainer(pareto_cfg(tiny_cfg))
    two = Trainer(pareto_cfg(tiny_cfg, grad_accum=2))
    inputs, y = next(iter(one.train_loader))
    half = len(y) // 2
    one.train_step(inputs, y, epoch=0, step=0)
    two.train_step({k: v[:half] for k, v in inputs.items()}, y[:half], epoch=0, step=0, update=False)
    two.train_step({k: v[half:] for k, v in inputs.items()}, y[half:], epoch=0, step=1, update=True)
    for (name, a), b in zip(one.raw_model.named_parameters(), two.raw_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_config_errors_name_the_keys(tiny_cfg):
    with pytest.raises(ConfigError, match="method.aib: off"):
        Trainer(tiny_cfg(method={"strategy": "mmpareto", "aib": "beta"}))
    with pytest.raises(ConfigError, match="method.unimodal_weight"):
        Trainer(tiny_cfg(method={"strategy": "mmpareto", "aib": "off", "unimodal_weight": 0}))
    with pytest.raises(ConfigError, match="gamma"):
        tiny_cfg(method={"strategy": "mmpareto", "aib": "off", "params": {"gamma": -1}})
    assert tiny_cfg(method={"strategy": "mmpareto", "aib": "off"}).method.params == {"gamma": 1.5}


def test_cli_run(tiny_cfg, tmp_path):
    cfg = pareto_cfg(tiny_cfg)
    path = tmp_path / "p.yaml"
    save_config(cfg.model_copy(update={"name": "pareto"}), path)
    assert train_main([str(path), "--set", "method.params.gamma=1.2", "--set", "optim.epochs=2"]) == 0
    run_dir = load_config(path).run_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0.0 <= summary["test_acc"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["mmpareto_conflict_audio"] <= 1.0 and 0.001 <= r["mmpareto_k_fused_visual"] <= 0.999
               for r in rows)
