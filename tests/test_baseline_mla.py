"""MLA (`method.strategy: mla` + `model.fusion: mla`): the projector update against Sherman–Morrison
(P ← (P⁻¹ + rᵀr/α)⁻¹, then Frobenius-normalised) and its effect (the projected head update leaves the
response to the modality's mean input unchanged as α → 0); two Trainer.train_steps against an independent
re-implementation of the reference's per-modality steps; the entropy-weighted test-time fusion by hand;
config errors; the CLI. The 2-worker Ray Train equivalence is in tests/test_baselines_t1b_ray.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calray.config import load_config, save_config
from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.mla import project
from calray.models.fusion import build_fusion
from calray.train import main as train_main

LR = 0.1


def mla_cfg(tiny_cfg, **optim):
    return tiny_cfg(model={"encoders": {"audio": {"name": "mlp", "hidden": [16]}, "visual": {"name": "mlp", "hidden": [16]}},
                           "fusion": "mla"},
                    method={"strategy": "mla", "aib": "off"},
                    optim={"name": "sgd", "lr": LR, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, **optim})


def sherman_morrison(P: np.ndarray, r: np.ndarray, alpha: float) -> np.ndarray:
    new = np.linalg.inv(np.linalg.inv(P) + np.outer(r, r) / alpha)
    return new / np.linalg.norm(new)


def test_projector_update_is_the_rank_one_inverse_update_and_protects_the_mean_input():
    rng = np.random.default_rng(0)
    P = torch.eye(5, dtype=torch.float64)
    ref = np.eye(5)
    for alpha in (0.1, 0.05, 0.01):
        r = rng.normal(size=5)
        G = torch.tensor(rng.normal(size=(3, 5)))
        P, G_proj = project(P, torch.tensor(r)[None, :], G, alpha)
        ref = sherman_morrison(ref, r, alpha)
        assert np.allclose(P.numpy(), ref, atol=1e-10)
        assert torch.allclose(G_proj, G @ P.T)
    r = torch.tensor(rng.normal(size=5))[None, :]
    _, G_proj = project(torch.eye(5, dtype=torch.float64), r, torch.eye(5, dtype=torch.float64), 1e-9)
    # a head update −lr·G·Pᵀ changes the logits of input r by −lr·G·P·rᵀ ≈ 0
    assert float((G_proj @ r.T).norm()) < 1e-6 * float(r.norm())


def reference_steps(model, batches, steps_per_epoch):
    """main.py's gs_flag loop + GSPlugin, re-written with a backward per modality: returns the summed
    per-parameter gradients of each batch (head weight gradients projected), P kept across steps."""
    P, count, out = None, 0, []
    params = dict(model.named_parameters())
    for step, (inputs, y) in enumerate(batches):
        embs = {m: model.encoders[m](inputs[m]) for m in model.modalities}
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for m in model.modalities:
            model.zero_grad()
            F.cross_entropy(model.fusion.head(embs[m]), y).backward(retain_graph=True)
            g = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
            if count != 0:
                alpha = 0.1 ** (step / steps_per_epoch + 1)
                r = embs[m].detach().double().mean(0).numpy()
                P = sherman_morrison(np.eye(len(r)) if P is None else P, r, alpha)
                g["fusion.head.weight"] = g["fusion.head.weight"] @ torch.tensor(P.T, dtype=torch.float32)
            elif P is None:
                P = np.eye(embs[m].shape[1])
            count += 1
            total = {n: total[n] + g[n] for n in total}
        out.append(total)
        with torch.no_grad():  # the plug-in's one SGD update per batch with the summed gradient
            for n, p in params.items():
                p -= LR * total[n]
    return out


def test_train_steps_follow_the_reference_rule(tiny_cfg):
    trainer = Trainer(mla_cfg(tiny_cfg))
    model = trainer.raw_model
    batches = [b for _, b in zip(range(3), trainer.train_loader)]
    expected = reference_steps(copy.deepcopy(model), batches, trainer.batches_per_epoch())
    for step, (inputs, y) in enumerate(batches):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train_step(inputs, y, epoch=0, step=step)
        for n, p in model.named_parameters():
            assert torch.allclose((before[n] - p.detach()) / LR, expected[step][n], rtol=1e-3, atol=1e-6), (step, n)
    assert trainer.strategy.count == 6
    assert not torch.allclose(trainer.strategy.P, torch.eye(16) / 4)  # P moved off the (normalised) identity


def test_only_the_unimodal_losses_are_optimised(tiny_cfg):
    trainer = Trainer(mla_cfg(tiny_cfg))
    inputs, y = next(iter(trainer.train_loader))
    with torch.no_grad():
        out = trainer.raw_model(inputs)
        expected = sum(F.cross_entropy(trainer.raw_model.fusion.head(out.embeddings[m]), y) for m in ("audio", "visual"))
    assert float(trainer.train_step(inputs, y, epoch=0, step=0)) == pytest.approx(float(expected), rel=1e-6)


def test_entropy_weighted_fusion_by_hand():
    torch.manual_seed(0)
    f = build_fusion("mla", {"audio": 6, "visual": 6}, 4, None, {})
    embs = {"audio": torch.randn(5, 6), "visual": 3 * torch.randn(5, 6)}
    _, fused = f(embs)
    la, lv = (f.head(embs[m]).detach().double().numpy() for m in ("audio", "visual"))
    for i in range(5):
        ent = []
        for lg in (la[i], lv[i]):
            p = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
            ent.append(-(p * np.log(p)).sum())
        top = max(ent)
        wa, wv = np.exp(top - ent[0]), np.exp(top - ent[1])
        expected = (wa * la[i] + wv * lv[i]) / (wa + wv)
        assert np.allclose(fused[i].detach().numpy(), expected, atol=1e-5)
    assert torch.allclose(f.unimodal_logits(embs, "visual"), f.head(embs["visual"]))
    mean = build_fusion("mla", {"audio": 6, "visual": 6}, 4, None, {"dynamic": False})
    mean.load_state_dict(f.state_dict())
    assert torch.allclose(mean(embs)[1], (f.head(embs["audio"]) + f.head(embs["visual"])) / 2)


def test_config_errors_name_the_keys(tiny_cfg):
    with pytest.raises(ConfigError, match="model.fusion: mla"):
        Trainer(tiny_cfg(method={"strategy": "mla", "aib": "off"}))
    with pytest.raises(ConfigError, match="one size"):
        build_fusion("mla", {"audio": 6, "visual": 8}, 4, None, {})
    with pytest.raises(ConfigError, match="dynamic"):
        tiny_cfg(model={"fusion": "mla", "fusion_params": {"dynamic": "sometimes"}})


def test_cli_run_and_resume_keeps_the_projector(tiny_cfg, tmp_path):
    cfg = mla_cfg(tiny_cfg)
    path = tmp_path / "mla.yaml"
    save_config(cfg.model_copy(update={"name": "mla"}), path)
    assert train_main([str(path)]) == 0
    assert train_main([str(path), "--set", "optim.epochs=2"]) == 0  # resumes from epoch 1's checkpoint
    run_dir = load_config(path).run_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0.0 <= summary["test_acc"] <= 1.0
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["methods"][0]
    assert state["count"] == 2 * 2 * 8 and state["P"].shape == (16, 16)  # 2 epochs × 8 batches × 2 modalities
