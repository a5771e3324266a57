"""TMC (calray.models.tmc + calray.method.tmc): the Dempster–Shafer combination and the evidential loss
against independent computations, one train step of the loop, the config guard, and CLI runs on the
NYUD2 and MVSA-Single fixtures. The 2-worker equivalence is in tests/test_baselines_t2a_ray.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import digamma, gammaln
from scipy.stats import dirichlet

from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.tmc import evidential_loss, kl_to_uniform_dirichlet
from calray.models.tmc import TMCFusion, dirichlet_alpha, ds_combine, ds_combine_two
from tests.baselines_t2a import fixture_cli_run


def np_ds_two(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """Reduced Dempster's rule written from the paper (TMC eq 2), one sample, explicit loops."""
    k = len(a1)
    s1, s2 = a1.sum(), a2.sum()
    b1, b2, u1, u2 = (a1 - 1) / s1, (a2 - 1) / s2, k / s1, k / s2
    conflict = sum(b1[i] * b2[j] for i in range(k) for j in range(k) if i != j)
    b = np.array([(b1[i] * b2[i] + b1[i] * u2 + b2[i] * u1) / (1 - conflict) for i in range(k)])
    u = u1 * u2 / (1 - conflict)
    assert b.sum() + u == pytest.approx(1.0)  # the combined opinion is again an opinion
    return b * (k / u) + 1


def test_ds_combination_matches_the_rule_and_keeps_vacuous_opinions_neutral():
    rng = np.random.default_rng(0)
    alphas = [rng.uniform(1.0, 6.0, size=(5, 4)) for _ in range(3)]
    got = ds_combine([torch.tensor(a) for a in alphas]).numpy()
    for n in range(5):
        expected = np_ds_two(np_ds_two(alphas[0][n], alphas[1][n]), alphas[2][n])
        np.testing.assert_allclose(got[n], expected, rtol=1e-10)
    vacuous = torch.ones(5, 4, dtype=torch.float64)  # u = 1: no evidence, the other opinion is returned
    np.testing.assert_allclose(ds_combine_two(torch.tensor(alphas[0]), vacuous).numpy(), alphas[0], rtol=1e-10)
    np.testing.assert_allclose(ds_combine_two(vacuous, torch.tensor(alphas[1])).numpy(), alphas[1], rtol=1e-10)


def test_evidential_loss_is_expected_ce_plus_annealed_kl():
    rng = np.random.default_rng(1)
    alpha = rng.uniform(1.0, 5.0, size=(3, 4))
    labels = np.array([0, 3, 1])
    coef = 0.3
    expected = []
    for a, y in zip(alpha, labels):
        p = rng.dirichlet(a, size=400_000)
        ece_mc = -np.log(p[:, y]).mean()  # E_{p~Dir(α)}[−log p_y] by Monte Carlo
        assert ece_mc == pytest.approx(digamma(a.sum()) - digamma(a[y]), abs=5e-3)
        tilde = a.copy()
        tilde[y] = 1.0  # α̃ = y + (1 − y)α: the target's evidence removed
        kl = -dirichlet.entropy(tilde) - gammaln(len(a))  # KL(q ‖ Dir(1)) = −H(q) − log Γ(K)
        expected.append(digamma(a.sum()) - digamma(a[y]) + coef * kl)
    got = evidential_loss(torch.tensor(alpha), torch.tensor(labels), coef)
    assert float(got) == pytest.approx(np.mean(expected), rel=1e-9)
    assert float(kl_to_uniform_dirichlet(torch.ones(1, 4, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)


def test_fusion_outputs_log_expected_probabilities_of_the_combined_opinion():
    torch.manual_seed(0)
    fusion = TMCFusion({"a": 3, "b": 5}, 4, None)
    embs = {"a": torch.randn(6, 3), "b": torch.randn(6, 5)}
    alpha, logits = fusion(embs)
    ea = torch.nn.functional.softplus(fusion.heads["a"](embs["a"])) + 1
    eb = torch.nn.functional.softplus(fusion.heads["b"](embs["b"])) + 1
    expected = torch.tensor(np.stack([np_ds_two(x, y) for x, y in zip(ea.detach().double().numpy(),
                                                                       eb.detach().double().numpy())]))
    torch.testing.assert_close(alpha.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(6))
    assert torch.equal(fusion.unimodal_logits(embs, "a"), fusion.heads["a"](embs["a"]))
    assert torch.equal(dirichlet_alpha(torch.tensor([[-100.0, 0.0]]), "relu"), torch.tensor([[1.0, 1.0]]))


def tmc_cfg(tiny_cfg, **params):
    return tiny_cfg(model={"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}},
                           "fusion": "tmc"},
                    method={"strategy": "tmc", "aib": "off", "params": params},
                    optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1})


def test_one_train_step_optimises_the_evidential_loss(tiny_cfg):
    trainer = Trainer(tmc_cfg(tiny_cfg, annealing_epochs=4))
    model = trainer.raw_model
    inputs, y = next(iter(trainer.train_loader))
    with torch.no_grad():
        out = model(inputs)
    coef = 2 / 4  # epoch 2 of annealing_epochs 4
    alphas = {m: torch.nn.functional.softplus(out.unimodal_logits[m]) + 1 for m in ("audio", "visual")}
    combined = ds_combine([alphas["audio"], alphas["visual"]])
    expected = sum(float(evidential_loss(a, y, coef)) for a in (*alphas.values(), combined))
    before = [p.detach().clone() for p in model.parameters()]
    loss = trainer.train_step(inputs, y, epoch=2, step=0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # the gradient is that of the evidential loss alone: one SGD step by hand reproduces the update
    ref = Trainer(tmc_cfg(tiny_cfg, annealing_epochs=4)).raw_model
    out = ref(inputs)
    alphas = [torch.nn.functional.softplus(out.unimodal_logits[m]) + 1 for m in ("audio", "visual")]
    total = sum(evidential_loss(a, y, coef) for a in (*alphas, ds_combine(alphas)))
    total.backward()
    with torch.no_grad():
        for p_ref, p in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(p_ref - 0.1 * p_ref.grad, p, rtol=1e-5, atol=1e-6)


def test_the_strategy_refuses_other_fusions(tiny_cfg):
    with pytest.raises(ConfigError, match="model.fusion: tmc"):
        Trainer(tiny_cfg(method={"strategy": "tmc", "aib": "off"}))
    with pytest.raises(ConfigError, match="method.aib: off"):
        Trainer(tiny_cfg(model={"fusion": "tmc"}, method={"strategy": "tmc"}))
    with pytest.raises(ConfigError, match="annealing_epochs"):
        tmc_cfg(tiny_cfg, annealing_epochs=0)


@pytest.mark.parametrize("dataset", ["nyud2", "mvsa"])
def test_cli_run_on_the_dataset_fixture(tmp_path, dataset):
    summary, rows, cfg = fixture_cli_run(tmp_path, dataset, {"method.strategy": "tmc", "method.aib": "off",
                                                             "model.fusion": "tmc"})
    assert cfg.method.params == {"annealing_epochs": 10} and cfg.model.fusion_params == {"evidence": "softplus"}
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test"]["n"] > 0
    mods = summary["modalities"]
    assert all(math.isfinite(rows[0][f"train_loss_tmc_{m}"]) for m in mods)
    # epoch 0: KL annealing coefficient 0, so the training loss is the expected cross-entropies alone
    assert rows[0]["train_loss"] == pytest.approx(sum(rows[0][f"train_loss_tmc_{k}"] for k in (*mods, "fused")), rel=1e-6)
