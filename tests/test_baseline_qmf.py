"""QMF (calray.models.qmf + calray.method.qmf): the energy-weighted late fusion and the ranking term
against independent computations (torch's MarginRankingLoss on the reference's pair construction,
a numpy loss history), the sample-index hook, one train step, the config guard, CLI runs on the NYUD2
and MVSA-Single fixtures. The 2-worker equivalence is in tests/test_baselines_t2a_ray.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from calray.data.indexed import WithIndex
from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.qmf import normalised_history, ranking_loss
from calray.models.qmf import QMFFusion
from tests.baselines_t2a import fixture_cli_run


def reference_rank_loss(conf: torch.Tensor, cum: np.ndarray) -> torch.Tensor:
    """The reference's construction: pairs (i, roll(i)), min-max normalised history, target/margin,
    MarginRankingLoss(margin=0)(c1, c2 + margin/target_nonzero, −target)."""
    c1, c2 = cum, np.roll(cum, -1)
    target = torch.tensor((c1 > c2).astype(float) - (c1 < c2).astype(float), dtype=torch.float32)
    margin = torch.tensor(np.abs(c1 - c2), dtype=torch.float32)
    nonzero = target.clone()
    nonzero[nonzero == 0] = 1
    return nn.MarginRankingLoss(margin=0.0)(conf, torch.roll(conf, -1) + margin / nonzero, -target)


def test_ranking_loss_matches_the_reference_construction():
    rng = np.random.default_rng(0)
    history = rng.uniform(0, 5, size=50)
    idx = torch.tensor([3, 17, 4, 4 + 1, 40, 9, 9])  # a tie (9, 9) gives target 0
    normed = (history[idx.numpy()] - history.min()) / (history.max() - history.min())
    conf = torch.tensor(rng.normal(size=7), dtype=torch.float32, requires_grad=True)
    got = ranking_loss(conf, normalised_history(torch.tensor(history), idx).float())
    ref_conf = conf.detach().clone().requires_grad_(True)
    ref = reference_rank_loss(ref_conf, normed)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6) and float(ref.detach()) > 0
    got.backward()
    ref.backward()
    torch.testing.assert_close(conf.grad, ref_conf.grad)
    flat = normalised_history(torch.zeros(50, dtype=torch.float64), idx)  # the first step: no signal, no NaN
    assert torch.equal(flat, torch.zeros(7, dtype=torch.float64))


def test_fusion_weights_each_modality_by_its_energy_confidence():
    torch.manual_seed(0)
    fusion = QMFFusion({"a": 3, "b": 5}, 4, None)
    embs = {"a": torch.randn(6, 3), "b": torch.randn(6, 5)}
    _, fused = fusion(embs)
    za, zb = fusion.heads["a"](embs["a"]), fusion.heads["b"](embs["b"])
    conf = {k: 0.1 * torch.log(torch.exp(z).sum(1, keepdim=True)) for k, z in (("a", za), ("b", zb))}  # −0.1·energy
    torch.testing.assert_close(fused, conf["a"] * za + conf["b"] * zb)
    # the confidence carries gradient on NYUD2 (default) and is detached on MVSA (detach_confidence)
    g = torch.autograd.grad(fused.sum(), fusion.heads["a"].bias)[0]
    detached = QMFFusion({"a": 3, "b": 5}, 4, None, {"detach_confidence": True})
    detached.load_state_dict(fusion.state_dict())
    g_det = torch.autograd.grad(detached(embs)[1].sum(), detached.heads["a"].bias)[0]
    torch.testing.assert_close(g_det, conf["a"].sum().expand(4).detach())  # ∂(c·z)/∂b with c constant
    assert not torch.allclose(g, g_det)


def test_with_index_yields_the_training_set_index(tiny_cfg):
    trainer = Trainer(qmf_cfg(tiny_cfg))
    assert isinstance(trainer.train_loader.dataset.dataset, WithIndex)  # whole-batch fetching kept
    inputs, labels, idx = next(iter(trainer.train_loader))
    order = trainer.train_loader.sampler.sampler.order()[:len(labels)]
    assert idx.tolist() == order
    base_inputs, base_labels = trainer.splits.train.get_batch(order) if hasattr(trainer.splits.train, "get_batch") \
        else WithIndex(trainer.splits.train)._fetch(order)
    assert torch.equal(labels, base_labels) and torch.equal(inputs["audio"], base_inputs["audio"])
    item = WithIndex(trainer.splits.train)[5]
    assert item[2] == 5 and item[1] == trainer.splits.train[5][1]


def qmf_cfg(tiny_cfg, fusion_params=None, **params):
    return tiny_cfg(model={"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}},
                           "fusion": "qmf", "fusion_params": fusion_params or {}},
                    method={"strategy": "qmf", "aib": "off", "params": params},
                    optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1})


@pytest.mark.parametrize("history_first", [False, True])
def test_train_steps_add_the_ranking_term_and_keep_the_loss_history(tiny_cfg, history_first):
    # conf_scale 20: confidence gaps larger than the history margins, so the hinge is active
    trainer = Trainer(qmf_cfg(tiny_cfg, {"conf_scale": 20.0}, rank_weight=0.5, history_first=history_first))
    model, strategy = trainer.raw_model, trainer.strategy
    history = {m: np.zeros(len(trainer.splits.train)) for m in ("audio", "visual")}
    first, second = list(zip(range(2), trainer.train_loader))
    ranks = []
    for step, (inputs, y, idx) in enumerate([first[1], first[1], second[1]]):  # a batch seen again: a ranking signal
        with torch.no_grad():
            out = model(inputs)
        ce = {m: torch.nn.functional.cross_entropy(out.unimodal_logits[m], y, reduction="none") for m in history}
        expected = float(torch.nn.functional.cross_entropy(out.fused_logits, y)) + sum(float(v.mean()) for v in ce.values())
        rank = 0.0
        for m in history:  # NYUD2: rank on the history before this batch, then add it; MVSA: add first
            h = history[m]
            if history_first:
                np.add.at(h, idx.numpy(), ce[m].double().numpy())
            normed = np.zeros(len(y)) if h.max() == h.min() else (h[idx] - h.min()) / (h.max() - h.min())
            rank += float(reference_rank_loss(20.0 * torch.logsumexp(out.unimodal_logits[m], 1), normed))
            if not history_first:
                np.add.at(h, idx.numpy(), ce[m].double().numpy())
        loss = trainer.train_step(inputs, y, epoch=0, step=step, indices=idx)
        assert float(loss) == pytest.approx(expected + 0.5 * rank, rel=1e-5), step
        for m in history:
            np.testing.assert_allclose(strategy.history[m].numpy(), history[m], rtol=1e-6)
        ranks.append(rank)
    assert ranks[1] > 0 and (ranks[0] > 0) == history_first  # NYUD2 order: nothing to rank on the first step


def test_the_strategy_refuses_other_settings(tiny_cfg):
    with pytest.raises(ConfigError, match="model.fusion: qmf"):
        Trainer(tiny_cfg(method={"strategy": "qmf", "aib": "off"}))
    with pytest.raises(ConfigError, match="unimodal_weight"):
        Trainer(tiny_cfg(model={"fusion": "qmf"}, method={"strategy": "qmf", "aib": "off", "unimodal_weight": 0.5}))


@pytest.mark.parametrize("dataset,params", [("nyud2", {}), ("mvsa", {"rank_weight": 1.0, "history_first": True})])
def test_cli_run_on_the_dataset_fixture(tmp_path, dataset, params):
    extra = {"method.strategy": "qmf", "method.aib": "off", "model.fusion": "qmf"}
    extra.update({f"method.params.{k}": v for k, v in params.items()})
    if dataset == "mvsa":
        extra["model.fusion_params.detach_confidence"] = True
    summary, rows, cfg = fixture_cli_run(tmp_path, dataset, extra)
    assert cfg.method.params == {"rank_weight": 0.1, "history_first": False, **params}
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test"]["n"] > 0
    assert all(np.isfinite(rows[0][f"train_rank_{m}"]) for m in summary["modalities"])
    last = torch.load(cfg.run_dir() / "checkpoints" / "last.pt", weights_only=False)["methods"][0]["history"]
    assert all(float(h.sum()) > 0 and int((h > 0).sum()) <= 2 * cfg.data.batch_size for h in last.values())
