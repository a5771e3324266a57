"""Gradient modulation (paper eq 12–14, Fig. 2 strategies, OGM-GE) against independent computations:
numpy softmax, autograd gradients of an unmodulated backward, and OGM-GE's coefficient written out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calray.config import MethodConfig
from calray.data.base import build_datasets
from calray.errors import ConfigError
from calray.models import MultimodalModel, build_model
from calray.models.encoders import MLPEncoder
from calray.models.fusion import ConcatFusion
from calray.config import RunConfig
from calray.method.base import MethodContext, Step
from calray.method.modulation import apply_ogm_ge, contribution_softmax, ogm_coefficients, ogm_scores, scale_gradients
from calray.registry import STRATEGIES

W = {"audio": 0.8, "visual": -0.3, "text": 0.1}
PUBLISHED_OGM = {"aib": "off", "unimodal_weight": 0}


def strategy_plugin(modalities=("audio", "visual"), **method):
    """The strategy plug-in the loop would build for these method settings."""
    if method.get("strategy") == "ogm_ge":
        method = {**PUBLISHED_OGM, **method}
    cfg = RunConfig(method=MethodConfig(**method))
    return STRATEGIES.get(cfg.method.strategy)(cfg, list(modalities), MethodContext(0, [1, 1, 1], 3))


def modulation_coefficients(strategy, W, T):
    """a for W under `strategy`, as the plug-in refreshes it (eq 12 and its ablations)."""
    return strategy_plugin(tuple(W), strategy=strategy, T=T).on_contributions(W)["a"]


def after_backward(plugin, model, epoch, unimodal_logits, labels) -> dict:
    """Run the plug-in's gradient hook as the loop does on an update; what it applied."""
    out = type("Out", (), {"unimodal_logits": unimodal_logits})()
    plugin.after_backward(model, Step(epoch, 0, labels, out, ce={}))
    return plugin.last_applied




def np_softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


# ------------------------------------------------------------------ eq 12 and the strategies


def test_softmax_matches_numpy():
    for t in (0.5, 1.0, 3.0):
        a = contribution_softmax(W, t)
        ref = np_softmax(t * np.array(list(W.values())))
        assert list(a) == list(W)
        assert np.allclose(list(a.values()), ref, rtol=1e-12)
        assert sum(a.values()) == pytest.approx(1.0)


def test_temperature_is_an_inverse_temperature():
    """eq 12 multiplies W by T: T → 0 gives a uniform a, large T a one-hot on the largest W,
    and the entropy of a falls monotonically as T grows."""
    a0 = contribution_softmax(W, 1e-9)
    assert all(v == pytest.approx(1 / 3, abs=1e-8) for v in a0.values())
    big = contribution_softmax(W, 1e4)
    assert big["audio"] == pytest.approx(1.0, abs=1e-12)
    assert big["visual"] < 1e-12 and big["text"] < 1e-12
    ent = [-sum(p * math.log(p) for p in contribution_softmax(W, t).values() if p > 0)
           for t in (0.01, 0.1, 1.0, 5.0, 50.0)]
    assert all(x > y for x, y in zip(ent, ent[1:]))
    assert ent[0] == pytest.approx(math.log(3), abs=1e-3)


def test_weak_reverses_cal_and_null_is_uniform():
    cal = modulation_coefficients("cal", W, 2.0)
    weak = modulation_coefficients("weak", W, 2.0)
    assert sorted(W, key=cal.get) == sorted(W, key=lambda m: W[m])
    assert sorted(W, key=weak.get) == sorted(W, key=lambda m: -W[m])
    assert np.allclose(list(weak.values()), np_softmax(-2.0 * np.array(list(W.values()))))
    assert modulation_coefficients("null", W, 2.0) == {m: pytest.approx(1 / 3) for m in W}
    assert modulation_coefficients("none", W, 2.0) == {m: 0.0 for m in W}
    assert modulation_coefficients("ogm_ge", W, 2.0) == {m: 0.0 for m in W}
    assert modulation_coefficients("ogm_ge_mix", W, 2.0) == {m: 0.0 for m in W}
    with pytest.raises(ValueError):
        modulation_coefficients("strong", W, 1.0)


# ------------------------------------------------------------------ eq 14 on a real model


@pytest.fixture
def model_and_batch(tiny_cfg):
    cfg = tiny_cfg(method={"aib": "beta"}, model={"encoders": {"audio": {"name": "mlp", "hidden": [16, 8]},
                                                                   "visual": {"name": "mlp", "hidden": [32]}}})
    splits = build_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, splits)
    items = [splits.train[i] for i in range(24)]
    inputs = {m: torch.stack([torch.as_tensor(x[m]) for x, _ in items]) for m in splits.modalities}
    labels = torch.tensor([int(y) for _, y in items])
    return model, inputs, labels


def backward_grads(model, inputs, labels, seed=123):
    """Forward (seeded: the AIB heads sample) and backward the eq 21 CE terms; return the model."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(inputs, ablation="zero")
    loss = F.cross_entropy(out.fused_logits, labels)
    loss = loss + sum(F.cross_entropy(v, labels) for v in out.unimodal_logits.values())
    loss = loss + 0.1 * sum(out.mu[m].pow(2).mean() for m in out.mu)
    loss.backward()
    return out


def grads_by_name(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_modality_parameters_partition_the_model(model_and_batch):
    model, _, _ = model_and_batch
    names = {id(p): n for n, p in model.named_parameters()}
    for m in ("audio", "visual"):
        own = {names[id(p)] for p in model.modality_parameters(m)}
        expected = {n for n in names.values() if n.startswith((f"encoders.{m}.", f"aib_heads.{m}."))}
        assert own == expected and own
        assert any(n.startswith(f"aib_heads.{m}.") for n in own)
    shared = {names[id(p)] for p in model.shared_parameters()}
    assert shared and all(n.startswith("fusion.") for n in shared)
    assert len(shared) + sum(len(model.modality_parameters(m)) for m in ("audio", "visual")) == len(names)


@pytest.mark.parametrize("strategy", ["cal", "weak", "null"])
def test_modulated_gradients_are_scaled_autograd_gradients(model_and_batch, strategy):
    model, inputs, labels = model_and_batch
    backward_grads(model, inputs, labels)
    ref = grads_by_name(model)
    assert len(ref) == len(list(model.parameters()))

    backward_grads(model, inputs, labels)  # identical state and seed → identical gradients
    eta = 0.7
    a = modulation_coefficients(strategy, {"audio": 1.3, "visual": 0.2}, 2.0)
    applied = scale_gradients(model, a, eta)
    assert applied == {m: pytest.approx(1 + eta * a[m]) for m in a}

    owner = {}
    for m in ("audio", "visual"):
        for p in model.modality_parameters(m):
            owner[id(p)] = m
    for n, p in model.named_parameters():
        if id(p) in owner:
            want = (1.0 + eta * a[owner[id(p)]]) * ref[n]
            assert torch.allclose(p.grad, want, rtol=1e-6, atol=1e-9), n
        else:
            assert torch.equal(p.grad, ref[n]), f"shared parameter {n} was modified"
    if strategy == "cal":
        assert a["audio"] > a["visual"]
    if strategy == "weak":
        assert a["audio"] < a["visual"]


def test_modulator_warmup_and_none(model_and_batch):
    from calray.config import MethodConfig

    model, inputs, labels = model_and_batch
    out = backward_grads(model, inputs, labels)
    ref = grads_by_name(model)

    mod = strategy_plugin(strategy="cal", eta=1.0, T=1.0, warmup_epochs=2)
    assert mod.a == {"audio": 0.5, "visual": 0.5}  # uniform before the first refresh
    a = mod.on_contributions({"audio": 2.0, "visual": 0.0})["a"]
    assert a["audio"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert after_backward(mod, model, 1, out.unimodal_logits, labels) == {}  # still warming up
    assert all(torch.equal(p.grad, ref[n]) for n, p in model.named_parameters())
    applied = after_backward(mod, model, 2, out.unimodal_logits, labels)
    assert applied["audio"] == pytest.approx(1 + a["audio"])
    enc = dict(model.named_parameters())["encoders.audio.net.0.weight"]
    assert torch.allclose(enc.grad, (1 + a["audio"]) * ref["encoders.audio.net.0.weight"])

    backward_grads(model, inputs, labels)
    none = strategy_plugin(strategy="none")
    none.on_contributions({"audio": 2.0, "visual": 0.0})
    assert after_backward(none, model, 5, out.unimodal_logits, labels) == {}
    assert all(torch.equal(p.grad, ref[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------ OGM-GE


def ogm_ge_reference(score_a, score_v, alpha, continuous=False):
    """OGM-GE's two-modality rule, written out as in the reference main.py: the modality whose
    score is larger gets 1 − tanh(α·relu(ratio)) (continuous: the issue's relu(ratio − 1)), the other 1."""
    relu = lambda x: max(x, 0.0)  # noqa: E731
    shift = 1.0 if continuous else 0.0
    ratio_v = score_v / score_a
    ratio_a = 1.0 / ratio_v
    if ratio_v > 1:
        return 1.0, 1.0 - math.tanh(alpha * relu(ratio_v - shift))
    if ratio_a > 1:
        return 1.0 - math.tanh(alpha * relu(ratio_a - shift)), 1.0
    return 1.0, 1.0


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("sa,sv,alpha", [(30.0, 12.0, 0.8), (5.0, 17.0, 0.3), (10.0, 10.0, 0.8), (40.0, 1.0, 2.0)])
def test_ogm_coefficients_two_modalities(sa, sv, alpha, continuous):
    k = ogm_coefficients({"audio": sa, "visual": sv}, alpha, continuous)
    ka, kv = ogm_ge_reference(sa, sv, alpha, continuous)
    assert k["audio"] == pytest.approx(ka, rel=1e-12)
    assert k["visual"] == pytest.approx(kv, rel=1e-12)
    assert min(k.values()) <= 1.0 and max(k.values()) == 1.0


def test_ogm_coefficients_m_modalities():
    k = ogm_coefficients({"a": 6.0, "b": 2.0, "c": 4.0}, 0.5, continuous=True)
    assert k["a"] == pytest.approx(1 - math.tanh(0.5 * (6.0 / 3.0 - 1)))
    assert k["b"] == 1.0
    assert k["c"] == pytest.approx(1 - math.tanh(0.5 * (4.0 / 4.0 - 1)))  # ρ = 1 → 1


def test_ogm_scores_hand():
    logits = {"a": torch.tensor([[2.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[0.0, 0.0], [3.0, 0.0]])}
    y = torch.tensor([0, 1])
    s = ogm_scores(logits, y)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  (2-class softmax of the true class)
    assert s[0] == pytest.approx(sig(2.0) + sig(1.0), rel=1e-6)
    assert s[1] == pytest.approx(0.5 + sig(-3.0), rel=1e-6)


def test_apply_ogm_ge_scales_weight_gradients_of_dominant_modality(model_and_batch):
    model, inputs, labels = model_and_batch
    backward_grads(model, inputs, labels)
    ref = grads_by_name(model)
    apply_ogm_ge(model, {"audio": 0.4, "visual": 1.0}, ge_noise=False)
    for n, p in model.named_parameters():
        if n.startswith(("encoders.audio.", "aib_heads.audio.")) and p.dim() >= 2:
            assert torch.allclose(p.grad, 0.4 * ref[n]), n
        else:
            assert torch.equal(p.grad, ref[n]), n  # biases, the other modality and fusion untouched


def test_apply_ogm_ge_noise_has_the_gradient_std_on_every_modality(model_and_batch):
    """GE (as in the reference OGM-GE code) adds N(0, std(g)²) to the weight gradients of both
    modalities; the dominant one is scaled first. Check the residual statistics."""
    model, inputs, labels = model_and_batch
    backward_grads(model, inputs, labels)
    ref = grads_by_name(model)
    gen = torch.Generator().manual_seed(0)
    apply_ogm_ge(model, {"audio": 0.4, "visual": 1.0}, ge_noise=True, generator=gen)
    checked = 0
    for n, p in model.named_parameters():
        k = 0.4 if n.startswith(("encoders.audio.", "aib_heads.audio.")) else 1.0
        if n.startswith(("encoders.", "aib_heads.")) and p.dim() >= 2:
            resid = (p.grad - k * ref[n]) / (ref[n].std() + 1e-8)
            if resid.numel() >= 200:
                assert abs(float(resid.mean())) < 0.25, n
                assert float(resid.std()) == pytest.approx(1.0, abs=0.2), n
                checked += 1
        else:
            assert torch.equal(p.grad, ref[n]), n
    assert checked >= 2


# ------------------------------------------------------------------ OGM-GE suppresses the dominant modality


def known_gradient_model():
    """Two MLP encoders and a concat head, every gradient set to known (seeded) values."""
    torch.manual_seed(0)
    model = MultimodalModel({"audio": MLPEncoder(6, [5, 4]), "visual": MLPEncoder(3, [4])},
                            ConcatFusion({"audio": 4, "visual": 4}, 3, None))
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    return model


@pytest.mark.parametrize("strategy", ["ogm_ge", "ogm_ge_mix"])
@pytest.mark.parametrize("dominant", ["audio", "visual"])
def test_ogm_suppression_lands_on_the_dominant_modality(strategy, dominant):
    """The modality whose unimodal logits are far more confident on the true labels gets its weight
    gradients (dim ≥ 2) scaled by 1 − tanh(α·ρ), ρ = s_dom / s_weak with s = Σ_batch softmax[y]
    computed here by hand; the other modality, every bias and the shared head keep their gradient."""
    alpha = 0.3
    labels = torch.arange(12) % 3
    onehot = F.one_hot(labels, 3).float()
    weak = "visual" if dominant == "audio" else "audio"
    logits = {dominant: 4.0 * onehot, weak: 0.3 * onehot}
    logits = {m: logits[m] for m in ("audio", "visual")}  # the model's modality order
    p_true = {m: math.exp(c) / (math.exp(c) + 2.0) for m, c in ((dominant, 4.0), (weak, 0.3))}
    rho = (12 * p_true[dominant]) / (12 * p_true[weak])
    k_dominant = 1.0 - math.tanh(alpha * rho)
    assert rho > 2.0 and 0.05 < k_dominant < 0.9

    method = dict(strategy=strategy, ogm_alpha=alpha, ogm_ge_noise=False)
    if strategy == "ogm_ge":
        method.update(aib="off", unimodal_weight=0)
    modulator = strategy_plugin(**method)
    model = known_gradient_model()
    ref = grads_by_name(model)
    applied = after_backward(modulator, model, 0, logits, labels)
    assert applied == {f"k_{dominant}": pytest.approx(k_dominant, rel=1e-6), f"k_{weak}": 1.0}
    scaled = 0
    for n, p in model.named_parameters():
        if n.startswith(f"encoders.{dominant}.") and p.dim() >= 2:
            assert torch.allclose(p.grad, k_dominant * ref[n], rtol=1e-6, atol=0.0), n
            scaled += 1
        else:
            assert torch.equal(p.grad, ref[n]), n  # the weak modality, biases and the fusion head
    assert scaled == (2 if dominant == "audio" else 1)


def test_ogm_window_is_inclusive_as_in_the_reference():
    """The reference modulates while modulation_starts <= epoch <= modulation_ends (0-based)."""
    labels = torch.arange(12) % 3
    logits = {"audio": 4.0 * F.one_hot(labels, 3).float(), "visual": torch.zeros(12, 3)}
    modulator = strategy_plugin(strategy="ogm_ge", ogm_epochs=(2, 5), ogm_ge_noise=False)
    for epoch, inside in ((1, False), (2, True), (5, True), (6, False)):
        model = known_gradient_model()
        ref = grads_by_name(model)
        applied = after_backward(modulator, model, epoch, logits, labels)
        assert bool(applied) == inside, epoch
        changed = not torch.equal(dict(model.named_parameters())["encoders.audio.net.0.weight"].grad,
                                  ref["encoders.audio.net.0.weight"])
        assert changed == inside, epoch


# ------------------------------------------------------------------ OGM-GE as published (fused CE only)


@pytest.mark.parametrize("loss_keys", [{}, {"aib": "beta", "unimodal_weight": 0},
                                       {"aib": "off", "unimodal_weight": 1.0}, {"aib": "off", "unimodal_weight": 0.5}])
def test_ogm_ge_requires_the_published_loss(tiny_cfg, loss_keys):
    """tiny_cfg has aib beta and the default unimodal_weight 1: ogm_ge must turn both off."""
    with pytest.raises(ConfigError) as err:
        tiny_cfg(method={"strategy": "ogm_ge", **loss_keys})
    msg = str(err.value)
    for want in ("method.aib", "method.unimodal_weight", "off", "0", "ogm_ge_mix", "fused cross-entropy"):
        assert want in msg, (want, msg)


def test_ogm_ge_mix_accepts_any_loss_and_ogm_ge_the_published_one(tiny_cfg):
    assert tiny_cfg(method={"strategy": "ogm_ge_mix"}).method.aib == "beta"
    mix = tiny_cfg(method={"strategy": "ogm_ge_mix", "aib": "off", "unimodal_weight": 0.5}).method
    assert (mix.aib, mix.unimodal_weight) == ("off", 0.5)
    published = tiny_cfg(method={"strategy": "ogm_ge", "aib": "off", "unimodal_weight": 0}).method
    assert (published.aib, published.unimodal_weight) == ("off", 0.0)
    with pytest.raises(ValueError, match="ogm_ge_mix"):
        MethodConfig(strategy="ogm_ge")  # the defaults are CAL's loss (aib beta, unimodal_weight 1)


def hand_first_step_losses(cfg) -> tuple[float, float]:
    """Fused CE and Σ_m unimodal CE of the initial model on the whole training set, by hand."""
    from calray.engine.trainer import Trainer

    trainer = Trainer(cfg)  # the same seeded data and initialisation train() builds
    items = [trainer.splits.train[i] for i in range(len(trainer.splits.train))]
    inputs = {m: torch.stack([torch.as_tensor(x[m]) for x, _ in items]) for m in trainer.modalities}
    labels = torch.tensor([int(y) for _, y in items])
    with torch.no_grad():
        out = trainer.raw_model(inputs)
    fused = float(F.cross_entropy(out.fused_logits, labels))
    unimodal = sum(float(F.cross_entropy(v, labels)) for v in out.unimodal_logits.values())
    return fused, unimodal


@pytest.mark.parametrize("strategy,unimodal_weight", [("ogm_ge", 0), ("ogm_ge_mix", 1.0)])
def test_published_ogm_ge_trains_on_the_fused_cross_entropy_only(tiny_cfg, strategy, unimodal_weight):
    """One step over the whole training set (batch = n_train): the logged train_loss is that step's
    loss. Published ogm_ge: the fused CE by hand, no unimodal or AIB term; ogm_ge_mix with the
    same (AIB-free) model: fused + Σ_m unimodal CE."""
    import json

    from calray.engine.trainer import train

    sections = dict(data={"batch_size": 256}, optim={"epochs": 1},
                    method={"strategy": strategy, "aib": "off", "unimodal_weight": unimodal_weight})
    fused, unimodal = hand_first_step_losses(tiny_cfg(name=f"hand_{strategy}", **sections))
    assert unimodal > 1.0  # the unimodal terms would be visible if they entered
    cfg = tiny_cfg(name=f"run_{strategy}", **sections)
    train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines() if line]
    assert rows[0]["train_samples"] == 256 == cfg.data.params["n_train"]
    assert rows[0]["train_loss"] == pytest.approx(fused + unimodal_weight * unimodal, rel=1e-5)
