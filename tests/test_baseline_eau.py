"""EAU (calray.models.eau + calray.method.eau): the variance weighting, the channel gate, the Gaussian
terms and the contrastive loss against independent computations; the global-batch noise; one train
step of the loop (loss value and the uncertainty-scaled update); the config guards; CLI runs on the
NYUD2 and MVSA-Single fixtures. The 2-worker equivalence is in tests/test_baselines_t2c_ray.py."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import calray.models.eau as eau_mod
from calray.engine.trainer import Trainer
from calray.errors import ConfigError
from calray.method.eau import info_nce, kl_regular
from calray.method.aib import kl_to_standard_normal
from calray.models.eau import EAUFusion, global_noise, unpack, variance_weights
from tests.baselines_t2a import fixture_cli_run

MODS = ("audio", "visual")


def reference_channel_gate(x: torch.Tensor, conv: torch.nn.Conv1d) -> torch.Tensor:
    """The reference's ChannelGate(C, 'avg') on B×C×L: mean over L → Conv1d(C, C, 3, padding 1) →
    sigmoid → x·score + x → sum over C."""
    score = torch.sigmoid(conv(x.mean(dim=2, keepdim=True)))
    return (x * score + x).sum(1)


def test_variance_weights_are_the_references_swapped_softmax():
    torch.manual_seed(0)
    lv_txt, lv_img = torch.randn(5, 7), torch.randn(5, 7)
    var_txt, var_img = lv_txt.exp(), lv_img.exp()
    w = variance_weights([lv_txt, lv_img])
    ref = torch.softmax(torch.stack([var_img, var_txt]), dim=0)  # the reference: txt_w = ref[0], img_w = ref[1]
    torch.testing.assert_close(w[0], ref[0])
    torch.testing.assert_close(w[1], ref[1])
    assert bool(((var_txt < var_img) == (w[0] > w[1])).all())  # the less uncertain modality weighs more


def test_fuse_equals_the_references_conv1d_channel_gate_and_eval_forward_by_hand():
    torch.manual_seed(1)
    fusion = EAUFusion({"a": 5, "b": 6}, 3, None, {"latent_dim": 8, "head_hidden": 4}).eval()
    conv = torch.nn.Conv1d(2, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[:, :, 1] = fusion.gate.weight  # only the centre tap meets the length-1 input
    x = torch.randn(4, 2, 8)
    torch.testing.assert_close(fusion.fuse([x[:, 0], x[:, 1]]), reference_channel_gate(x, conv))
    embs = {"a": torch.randn(4, 5), "b": torch.randn(4, 6)}
    with torch.no_grad():
        mus = [fusion.mu[m](embs[m]) for m in "ab"]
        var = [fusion.logvar[m](embs[m]).exp() for m in "ab"]
        wa = torch.exp(-var[0]) / (torch.exp(-var[0]) + torch.exp(-var[1]))
        h = reference_channel_gate(torch.stack([mus[0] * wa, mus[1] * (1 - wa)], 1), conv)
        mu_f = fusion.fused_mu(h)
        bn = fusion.bn
        hidden = (fusion.hidden(mu_f) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        expected = fusion.out(torch.relu(hidden))
        repr_, logits = fusion(embs)
    torch.testing.assert_close(logits, expected)
    parts = unpack(repr_, ["a", "b"], 8, 3)
    torch.testing.assert_close(parts["mu"], mu_f)
    assert torch.equal(parts["modalities"]["a"]["z1"], mus[0])  # evaluation: every ε = 0
    assert torch.equal(fusion.unimodal_logits(embs, "b"), fusion.clf["b"](mus[1]))


def test_uncertainty_probe_is_the_logit_variance_under_one_modalitys_draws():
    torch.manual_seed(4)
    s, latent = 3, 6
    fusion = EAUFusion({"a": 5, "b": 4}, 3, None, {"latent_dim": latent, "head_hidden": 4,
                                                    "uncertainty_samples": s}).train()
    embs = {"a": torch.randn(2, 5), "b": torch.randn(2, 4)}
    seed, step = int(fusion.noise_seed), int(fusion.noise_step)
    repr_, _ = fusion(embs)
    got = unpack(repr_, ["a", "b"], latent, 3)["modalities"]
    draws = global_noise(seed, step, 2, [latent, 4] + [latent] * 4 + [latent * s] * 2)
    conv = torch.nn.Conv1d(2, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[:, :, 1] = fusion.gate.weight
        mus = {m: fusion.mu[m](embs[m]) for m in "ab"}
        std = {m: fusion.logvar[m](embs[m]).exp() for m in "ab"}  # the reference's std = exp(logvar)
        for i, m in enumerate("ab"):
            torch.testing.assert_close(got[m]["z1"], mus[m] + std[m] * draws[2 + 2 * i])
            eps = draws[6 + i].view(2, s, latent)
            for n in range(2):
                variances = []
                for k in range(s):
                    rows = {o: mus[o][n] for o in "ab"}
                    rows[m] = mus[m][n] + std[m][n] * eps[n, k]  # m drawn, the other at its mean, unweighted
                    h = reference_channel_gate(torch.stack([rows["a"], rows["b"]])[None], conv)
                    bn = fusion.bn
                    x = (fusion.hidden(fusion.fused_mu(h)) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
                    logits = fusion.out(torch.relu(x * bn.weight + bn.bias))[0]
                    variances.append(float(logits.var()))
                assert float(got[m]["uncertainty"][n]) == pytest.approx(np.mean(variances), rel=1e-5)


def test_gaussian_terms_against_torch_distributions():
    torch.manual_seed(2)
    mu_a, lv_a, mu_b, lv_b = (torch.randn(6, 5, dtype=torch.float64) for _ in range(4))
    std_normal = Normal(torch.zeros_like(mu_a), torch.ones_like(mu_a))
    expected = kl_divergence(Normal(mu_a, (0.5 * lv_a).exp()), std_normal).sum(1).mean()
    torch.testing.assert_close(kl_to_standard_normal(mu_a, lv_a), expected)
    # KL_regular treats exp(logvar) as the standard deviation
    expected = kl_divergence(Normal(mu_a, lv_a.exp()), Normal(mu_b, lv_b.exp())).sum(1).mean()
    torch.testing.assert_close(kl_regular(mu_a, lv_a, mu_b, lv_b), expected)


def test_info_nce_is_the_references_formula():
    rng = np.random.default_rng(3)
    z1, z2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    tau = 0.5

    def semi(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        s = np.exp(a @ b.T / tau)
        return [-math.log(s[i, i] / (s[i].sum() + s[i].sum() - s[i, i])) for i in range(len(a))]

    expected = np.mean([(x + y) / 2 for x, y in zip(semi(z1, z2), semi(z2, z1))])
    assert float(info_nce(torch.tensor(z1), torch.tensor(z2), tau)) == pytest.approx(expected, rel=1e-10)


class _FakeDist:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return self.world


def test_global_noise_shards_the_single_process_draws_by_interleaving(monkeypatch):
    single = global_noise(7, 3, 6, [4, 2])
    monkeypatch.setattr(eau_mod, "is_distributed", lambda: True)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(eau_mod, "dist", _FakeDist(rank, 2))
        shards.append(global_noise(7, 3, 3, [4, 2]))
    for k in range(2):
        torch.testing.assert_close(shards[0][k], single[k][0::2])
        torch.testing.assert_close(shards[1][k], single[k][1::2])
    assert not torch.equal(global_noise(7, 4, 6, [4])[0], single[0])  # a new step draws anew


def eau_cfg(tiny_cfg, fusion_params=None, **params):
    return tiny_cfg(model={"encoders": {m: {"name": "mlp", "hidden": [32]} for m in MODS}, "fusion": "eau",
                           "fusion_params": fusion_params or {}},
                    method={"strategy": "eau", "aib": "off", "unimodal_weight": 0, "params": params},
                    optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1})


def hand_loss(model, inputs, y):
    """EAU's loss from a forward of `model` (train mode: its own noise), written from the reference."""
    seed, step = int(model.fusion.noise_seed), int(model.fusion.noise_step)
    out = model(inputs)
    p = unpack(out.fused_repr, list(MODS), 128, 4)
    q = p["modalities"]
    eps = global_noise(seed, step, len(y), [128, 64] + [128] * 4 + [1280] * 2)  # this step's draws, in order
    ib_logits = model.fusion.ib(p["mu"] + p["logvar"].exp() * eps[0])  # z = μ_f + exp(log σ²_f)·ε
    for i, m in enumerate(MODS):
        for k in (1, 2):
            torch.testing.assert_close(q[m][f"z{k}"], q[m]["mu"] + q[m]["logvar"].exp() * eps[1 + 2 * i + k])
    normal = lambda mu, lv: Normal(mu, (0.5 * lv).exp())  # noqa: E731
    std0 = lambda mu: Normal(torch.zeros_like(mu), torch.ones_like(mu))  # noqa: E731
    kl = sum(kl_divergence(normal(d["mu"], d["logvar"]), std0(d["mu"])).sum(1).mean() for d in (p, *q.values()))
    reg = kl_divergence(Normal(q["visual"]["mu"], q["visual"]["logvar"].exp()),
                        Normal(q["audio"]["mu"], q["audio"]["logvar"].exp())).sum(1).mean()
    con = sum(info_nce(d["z1"], d["z2"], 0.5) for d in q.values())
    total = (F.cross_entropy(out.fused_logits, y) + 1e-3 * kl + 1e-3 * F.cross_entropy(ib_logits, y) + 1e-5 * reg
             + 1e-3 * con)
    return total, {m: float(q[m]["uncertainty"].detach().mean()) for m in MODS}


def test_one_train_step_is_the_eau_loss_with_uncertainty_scaled_branch_gradients(tiny_cfg):
    zeta = 5.0
    trainer = Trainer(eau_cfg(tiny_cfg, zeta=zeta, modulation_start=0))
    model = trainer.raw_model
    ref = copy.deepcopy(model)  # same parameters and noise counter: the same draws
    inputs, y = next(iter(trainer.train_loader))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = trainer.train_step(inputs, y, epoch=0, step=0)
    expected, unc = hand_loss(ref, inputs, y)
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-5)
    expected.backward()
    scale = {"audio": 1 + zeta * unc["visual"], "visual": 1 + zeta * unc["audio"]}  # the other modality's Ū
    assert all(s > 1.01 for s in scale.values())
    for name, p_ref in ref.named_parameters():
        owner = [m for m in MODS if name.startswith((f"encoders.{m}.", f"fusion.mu.{m}.", f"fusion.logvar.{m}.",
                                                     f"fusion.clf.{m}."))]
        factor = scale[owner[0]] if owner else 1.0
        grad = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
        torch.testing.assert_close(dict(model.named_parameters())[name], before[name] - 0.1 * factor * grad,
                                   rtol=1e-4, atol=1e-6, msg=name)
    # outside the modulation window the gradient is not scaled
    late = Trainer(eau_cfg(tiny_cfg, zeta=zeta, modulation_start=3))
    ref2 = copy.deepcopy(late.raw_model)
    late.train_step(inputs, y, epoch=0, step=0)
    hand_loss(ref2, inputs, y)[0].backward()
    with torch.no_grad():
        for (name, p), p_ref in zip(late.raw_model.named_parameters(), ref2.parameters()):
            if p_ref.grad is not None:
                torch.testing.assert_close(p, p_ref - 0.1 * p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_config_guards(tiny_cfg):
    with pytest.raises(ConfigError, match="model.fusion: eau"):
        Trainer(tiny_cfg(method={"strategy": "eau", "aib": "off", "unimodal_weight": 0}))
    with pytest.raises(ConfigError, match="method.unimodal_weight: 0"):
        Trainer(tiny_cfg(model={"fusion": "eau"}, method={"strategy": "eau", "aib": "off"}))
    with pytest.raises(ConfigError, match="fusion_params.batchnorm: false"):
        Trainer(tiny_cfg(model={"fusion": "eau"}, method={"strategy": "eau", "aib": "off", "unimodal_weight": 0},
                         distributed={"workers": 2}))
    with pytest.raises(ConfigError, match="dropout"):
        eau_cfg(tiny_cfg, {"dropout": 1.0})
    with pytest.raises(ConfigError, match="temperature"):
        eau_cfg(tiny_cfg, temperature=0)


@pytest.mark.parametrize("dataset", ["nyud2", "mvsa"])
def test_cli_run_on_the_dataset_fixture(tmp_path, dataset):
    summary, rows, cfg = fixture_cli_run(tmp_path, dataset, {"method.strategy": "eau", "method.aib": "off",
                                                             "method.unimodal_weight": 0, "model.fusion": "eau"})
    assert cfg.method.params["kl_weight"] == 1e-3 and cfg.model.fusion_params["dropout"] == 0.211
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test"]["n"] > 0
    row = rows[0]
    terms = ("fused", "eau_kl", "eau_ib", "eau_regular", "eau_contrastive")
    assert all(math.isfinite(row[f"train_loss_{k}"]) and row[f"train_loss_{k}"] >= 0 for k in terms)
    assert row["train_loss"] == pytest.approx(sum(row[f"train_loss_{k}"] for k in terms), rel=1e-5)
    assert all(row[f"eau_scale_{m}"] == 1.0 for m in summary["modalities"])  # epoch 0 < modulation_start 5
