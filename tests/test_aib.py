"""The asymmetric information bottleneck (paper eq 17–20, Table IV) against independent computations:
torch.distributions' Gaussian KL, eq 17 on raw weights written out, and eq 20 by hand in `math`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from calray.models.heads import VariationalHead
from calray.method.aib import (
    MIN_BETA,
    aib_loss,
    aib_weights,
    compression_factors,
    kl_to_standard_normal,
    label_entropy,
)



def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 5, generator=g, dtype=torch.float64)
    logvar = torch.randn(7, 5, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    assert float(kl_to_standard_normal(mu, logvar)) == pytest.approx(float(ref.sum(1).mean()), rel=1e-12)
    assert float(kl_to_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4))) == 0.0


def test_beta_is_one_minus_a_and_eq17_on_raw_weights():
    a = {"audio": 0.7, "visual": 0.2, "text": 0.1}
    beta = compression_factors(a)
    for m in a:
        assert beta[m] == pytest.approx(1.0 - a[m])
    w = {"x": 2.0, "y": 3.0, "z": 5.0}  # eq 17 with un-normalised contributions
    beta = compression_factors(w)
    assert beta == {"x": pytest.approx(8 / 10), "y": pytest.approx(7 / 10), "z": pytest.approx(5 / 10)}
    # higher contribution → lower compression factor
    assert sorted(w, key=w.get) == sorted(w, key=lambda m: -beta[m])


def test_aib_modes_select_the_right_modalities():
    a = {"audio": 0.7, "visual": 0.1, "text": 0.2}
    assert aib_weights(a, "beta") == {m: pytest.approx(1 - v) for m, v in a.items()}
    assert aib_weights(a, "inv_beta") == {m: pytest.approx(1 / (1 - v)) for m, v in a.items()}
    assert aib_weights(a, "mi") == {"visual": 1.0}
    assert aib_weights(a, "mx") == {"audio": 1.0}
    assert aib_weights(a, "mx_mi") == {"audio": 1.0, "visual": 1.0}
    assert aib_weights(a, "off") == {}
    with pytest.raises(ValueError):
        aib_weights(a, "both")
    # inv_beta floors β at MIN_BETA before inverting
    skew = {"x": 0.9999, "y": 0.0001}
    assert aib_weights(skew, "inv_beta")["x"] == pytest.approx(1 / MIN_BETA)
    assert aib_weights(skew, "inv_beta")["y"] == pytest.approx(1 / 0.9999)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("placement", ["eq19", "eq20"])
def test_aib_loss_matches_hand_computation(placement):
    kl = {"a": torch.tensor(0.8, requires_grad=True), "b": torch.tensor(2.5, requires_grad=True)}
    ce = {"a": torch.tensor(0.4, requires_grad=True), "b": torch.tensor(1.6, requires_grad=True)}
    h_y = math.log(6)
    w = {"a": 0.3, "b": 0.7}
    loss = aib_loss(kl, ce, h_y, w, placement)
    expected, arg = 0.0, {}
    for m, (k, c) in {"a": (0.8, 0.4), "b": (2.5, 1.6)}.items():
        i_zy = h_y - c
        if placement == "eq19":  # −log σ(I(Z;Y) − β·I(Z;X))
            arg[m] = i_zy - w[m] * k
        else:  # eq 20 as printed: −log σ(β·I(Z;Y) − I(Z;X))
            arg[m] = w[m] * i_zy - k
        expected += -math.log(sigmoid(arg[m]))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dKL −log σ(x) = −σ(−x)·dx/dKL; eq 19: dx/dKL = −w, dx/dCE = −1; eq 20: dx/dKL = −1, dx/dCE = −w
    s_a = sigmoid(-arg["a"])
    dkl, dce = (w["a"], 1.0) if placement == "eq19" else (1.0, w["a"])
    assert float(kl["a"].grad) == pytest.approx(dkl * s_a, rel=1e-6)
    assert float(ce["a"].grad) == pytest.approx(dce * s_a, rel=1e-6)
    only_a = aib_loss(kl, ce, h_y, {"a": 0.3}, placement)
    assert float(only_a.detach()) == pytest.approx(-math.log(sigmoid(arg["a"])), rel=1e-6)
    assert float(aib_loss(kl, ce, h_y, {}, placement).detach()) == 0.0
    with pytest.raises(ValueError):
        aib_loss(kl, ce, h_y, w, "eq21")


@pytest.mark.parametrize("placement,harder", [("eq19", "weak"), ("eq20", "dominant")])
def test_placement_decides_which_modality_is_compressed_harder(placement, harder):
    """Same KL and CE for both modalities, a = (0.9, 0.1): ∂L/∂KL_m is the pull toward compression.
    eq 19 pulls the weak modality (β = 0.9) harder, eq 20 the dominant one (β = 0.1)."""
    a = {"dominant": 0.9, "weak": 0.1}
    kl = {m: torch.tensor(1.5, requires_grad=True) for m in a}
    ce = {m: torch.tensor(1.0) for m in a}
    aib_loss(kl, ce, math.log(4), aib_weights(a, "beta"), placement).backward()
    other = "dominant" if harder == "weak" else "weak"
    assert float(kl[harder].grad) > float(kl[other].grad) > 0


def test_default_placement_is_eq19():
    from calray.config import MethodConfig

    assert MethodConfig().aib_placement == "eq19"
    kl = {"x": torch.tensor(1.0)}
    ce = {"x": torch.tensor(0.5)}
    assert float(aib_loss(kl, ce, 1.0, {"x": 0.2})) == pytest.approx(float(F.softplus(torch.tensor(0.2 - 0.5))))


def test_label_entropy():
    assert label_entropy([10, 10, 10, 10]) == pytest.approx(math.log(4))
    assert label_entropy([3, 1, 0]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_variational_head_reparameterises_in_training_and_uses_mean_in_eval():
    torch.manual_seed(0)
    head = VariationalHead(6, 4)
    h = torch.randn(5, 6)
    torch.manual_seed(11)
    z, mu, logvar = head.train()(h)
    params = head.params(h)
    assert torch.allclose(mu, params[:, :4]) and torch.allclose(logvar, params[:, 4:])
    torch.manual_seed(11)
    eps = torch.randn(5, 4)
    assert torch.allclose(z, mu + torch.exp(0.5 * logvar) * eps, atol=1e-6)
    z_eval, mu_eval, _ = head.eval()(h)
    assert torch.equal(z_eval, mu_eval)
