"""PMR (calray.method.pmr): class prototypes of the training split with momentum, the prototype
cross-entropy added for the weak modality only, and its effect on one step of the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.pmr import prototype_logits
from tests.baseline_helpers import branch, cli_run, first_batch, sgd_tree, step_delta

PMR = {"strategy": "pmr", "unimodal_weight": 0}


@torch.no_grad()
def hand_prototypes(trainer) -> dict[str, np.ndarray]:
    """Class means of every training sample's embedding, one sample at a time, in numpy."""
    model = trainer.raw_model
    model.eval()
    ds = trainer.splits.train
    feats = {m: [] for m in trainer.modalities}
    labels = []
    for i in range(len(ds)):
        x, y = ds[i][:2]
        out = model({m: v[None] for m, v in x.items()})
        for m in feats:
            feats[m].append(out.embeddings[m][0].double().numpy())
        labels.append(int(y))
    model.train()
    labels = np.array(labels)
    return {m: np.stack([np.mean(np.array(f)[labels == k], 0) for k in range(trainer.splits.num_classes)])
            for m, f in feats.items()}


def test_prototype_logits_are_negative_euclidean_distances():
    h, c = torch.randn(4, 3), torch.randn(5, 3)
    expected = -np.linalg.norm(h.numpy()[:, None, :] - c.numpy()[None], axis=-1)
    assert np.allclose(prototype_logits(h, c).numpy(), expected, atol=1e-5)


def test_prototypes_then_weak_modality_loss_in_one_step(tiny_cfg):
    """First step: prototypes = the initial model's class means; the loss is CE_f + α·PCE of the
    modality with the smaller prototype score; the strong modality's encoder moves exactly as under
    plain fused-CE training, the weak one's does not."""
    alpha = 2.0
    plain = Trainer(tiny_cfg(**sgd_tree(unimodal_weight=0)))
    pmr = Trainer(tiny_cfg(**sgd_tree(**PMR, params={"alpha": alpha, "momentum_coef": 0.25})))
    protos = hand_prototypes(pmr)
    inputs, y = first_batch(plain)
    with torch.no_grad():
        out = plain.raw_model(inputs)
    sims = {m: -torch.cdist(out.embeddings[m].double(), torch.from_numpy(protos[m])) for m in protos}
    score = {m: float(F.softmax(s, 1).gather(1, y[:, None]).sum()) for m, s in sims.items()}
    weak = min(score, key=score.get)
    strong = max(score, key=score.get)
    expected = F.cross_entropy(out.fused_logits.double(), y) + alpha * F.cross_entropy(sims[weak], y)
    base = step_delta(plain, inputs, y)
    before = {k: p.detach().clone() for k, p in pmr.raw_model.named_parameters()}
    loss = pmr.train_step(inputs, y, epoch=0, step=0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for m in protos:
        assert np.allclose(pmr.strategy.protos[m].double().numpy(), protos[m], atol=1e-5), m
    moved = {k: p.detach() - before[k] for k, p in pmr.raw_model.named_parameters()}
    for name, delta in base.items():
        if branch(name) == weak:
            continue
        assert torch.allclose(moved[name], delta, atol=1e-7), name  # the PCE of `weak` touches only its encoder
    assert any(not torch.allclose(moved[k], base[k], atol=1e-6) for k in base if branch(k) == weak)
    assert pmr.strategy.last_scores[strong] > pmr.strategy.last_scores[weak]
    # epoch end: new class means of the trained model, mixed with momentum 0.25
    old = {m: t.clone() for m, t in pmr.strategy.protos.items()}
    now = hand_prototypes(pmr)
    pmr.strategy.on_epoch_end(pmr.raw_model, 0, pmr.evaluate_split)
    for m in now:
        assert np.allclose(pmr.strategy.protos[m].double().numpy(), 0.75 * now[m] + 0.25 * old[m].double().numpy(),
                           atol=1e-5), m


def test_the_weak_modality_is_the_one_with_less_probability_on_the_true_class(tiny_cfg):
    """audio is confidently wrong (near class 1's prototype, label 0), visual unsure but right: the
    score is the probability of the TRUE class, so audio is the weak one and gets the PCE term."""
    from types import SimpleNamespace

    from calray.method.base import Step

    pmr = Trainer(tiny_cfg(**sgd_tree(**PMR, params={"alpha": 1.5}))).strategy
    pmr.protos = {"audio": torch.tensor([[0.0, 0.0], [4.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0], [0.6, 0.0]])}
    embs = {"audio": torch.tensor([[3.9, 0.0], [3.8, 0.1]]), "visual": torch.tensor([[0.2, 0.0], [0.25, 0.0]])}
    y = torch.tensor([0, 0])
    terms = pmr.loss_terms(Step(0, 0, y, SimpleNamespace(embeddings=embs), {}), {"fused": torch.zeros(())})
    audio_pce = F.cross_entropy(-torch.cdist(embs["audio"], pmr.protos["audio"]), y)
    assert float(terms["proto"]) == pytest.approx(1.5 * float(audio_pce), rel=1e-5)
    assert pmr.last_scores["audio"] < pmr.last_scores["visual"]


def test_outside_the_window_the_loss_is_fused_ce(tiny_cfg):
    plain = Trainer(tiny_cfg(**sgd_tree(unimodal_weight=0)))
    pmr = Trainer(tiny_cfg(**sgd_tree(**PMR, params={"modulation_ends": 0})))
    inputs, y = first_batch(plain)
    base, moved = step_delta(plain, inputs, y, epoch=1), step_delta(pmr, inputs, y, epoch=1)
    assert all(torch.allclose(moved[k], base[k], atol=1e-7) for k in base)


def test_pmr_requires_the_published_loss(tiny_cfg):
    with pytest.raises(ConfigError, match="method.aib.*method.unimodal_weight"):
        Trainer(tiny_cfg(method={"strategy": "pmr"}))


def test_cli_run_and_resume_state(tiny_cfg, tmp_path):
    from calray.engine.checkpoint import load_checkpoint

    cfg = tiny_cfg(name="pmr_cli")
    cli_run(cfg, tmp_path, ["method.strategy=pmr", "method.aib=off", "method.unimodal_weight=0"])
    rows = [json.loads(r) for r in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["pmr_score_audio"] + rows[-1]["pmr_score_visual"] == pytest.approx(1.0)
    protos = load_checkpoint(cfg.run_dir() / "checkpoints" / "last.pt")["methods"][0]["protos"]
    assert protos["audio"].shape == (4, 32) and torch.isfinite(protos["visual"]).all()
