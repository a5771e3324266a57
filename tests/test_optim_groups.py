"""Per-modality optimiser groups (calray/optim.py): eq 14's gradient scale survives SGD and is undone by
Adam, measured as parameter displacement through the trainer; groups, warnings and resume."""

from __future__ import annotations

import json

import pytest
import torch

from calray.errors import ConfigError
from calray.engine.trainer import Trainer

SCALE = 1.9  # strategy null, M = 2: a_m = 1/2, so 1 + η·a_m = 1.9 with η = 1.8


def one_step_displacement(tiny_cfg, strategy: str, per_modality: dict) -> dict[str, float]:
    """‖Δθ‖ per parameter block (audio / visual encoder, shared) after one update on the same batch."""
    cfg = tiny_cfg(method={"strategy": strategy, "eta": 1.8, "aib": "off"},
                   optim={"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "epochs": 1,
                          "per_modality": per_modality})
    trainer = Trainer(cfg)
    model = trainer.raw_model
    blocks = {"audio": model.modality_parameters("audio"), "visual": model.modality_parameters("visual"),
              "shared": model.shared_parameters()}
    before = {k: [p.detach().clone() for p in ps] for k, ps in blocks.items()}
    inputs, labels = next(iter(trainer.train_loader))
    trainer.train_step(inputs, labels, epoch=0, step=0)
    return {k: float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(ps, before[k]))))
            for k, ps in blocks.items()}


def test_gradient_scale_moves_sgd_parameters_and_not_adam_ones(tiny_cfg):
    groups = {"visual": {"name": "adam", "lr": 0.001}}  # audio: SGD (default group), visual: Adam
    plain = one_step_displacement(tiny_cfg, "none", groups)
    scaled = one_step_displacement(tiny_cfg, "null", groups)
    assert scaled["audio"] / plain["audio"] == pytest.approx(SCALE, rel=1e-5)  # SGD keeps eq 14's scale
    assert scaled["visual"] / plain["visual"] == pytest.approx(1.0, abs=2e-3)  # Adam normalises it away
    assert scaled["shared"] == pytest.approx(plain["shared"], rel=1e-6)  # θ_s is never modulated


def test_groups_take_their_settings_and_shared_parameters_stay_default(tiny_cfg):
    cfg = tiny_cfg(optim={"name": "sgd", "lr": 0.05, "momentum": 0.8, "weight_decay": 1e-4,
                          "per_modality": {"visual": {"name": "adamw", "lr": 2e-5, "betas": [0.8, 0.9]},
                                           "audio": {"lr": 0.2}}})
    trainer = Trainer(cfg)
    opts = {type(o).__name__: o for o in trainer.optimizer.optimizers}
    assert set(opts) == {"SGD", "AdamW"}
    sgd_groups = {g["group"]: g for g in opts["SGD"].param_groups}
    assert sgd_groups["audio"]["lr"] == 0.2 and sgd_groups["audio"]["momentum"] == 0.8  # unset keys inherit
    assert sgd_groups["default"]["lr"] == 0.05
    (adamw,) = opts["AdamW"].param_groups
    assert adamw["group"] == "visual" and adamw["lr"] == 2e-5 and adamw["betas"] == (0.8, 0.9)
    assert adamw["weight_decay"] == 1e-4
    model = trainer.raw_model
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(adamw["params"]) == ids(model.modality_parameters("visual"))
    assert ids(sgd_groups["audio"]["params"]) == ids(model.modality_parameters("audio"))
    assert ids(sgd_groups["default"]["params"]) == ids(model.shared_parameters())
    all_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(all_params) == len(ids(all_params)) == len(list(model.parameters()))  # each exactly once


def test_unknown_modality_group_is_a_config_error(tiny_cfg):
    with pytest.raises(ConfigError, match=r"optim\.per_modality\.text: not a modality"):
        Trainer(tiny_cfg(optim={"per_modality": {"text": {"name": "adam"}}}))


@pytest.mark.parametrize("optim,strategy,warned", [
    ({"name": "adam", "lr": 1e-3}, "cal", ["audio", "visual"]),
    ({"name": "sgd", "per_modality": {"visual": {"name": "adamw"}}}, "cal", ["visual"]),
    ({"name": "sgd"}, "cal", []),
    ({"name": "adam", "lr": 1e-3}, "none", []),  # nothing is modulated
])
def test_modulation_under_an_adaptive_optimiser_warns_once(tiny_cfg, capsys, optim, strategy, warned):
    cfg = tiny_cfg(method={"strategy": strategy}, optim={**optim, "epochs": 2})
    Trainer(cfg).fit()
    env = json.loads((cfg.run_dir() / "env.json").read_text())
    assert [w.split("modality ")[1].split("'")[1] for w in env["warnings"]] == warned
    err = capsys.readouterr().err
    assert err.count("warning: ") == len(warned)  # once per run, not per epoch


def test_two_optimiser_types_resume_exactly(tiny_cfg):
    groups = {"visual": {"name": "adam", "lr": 1e-3}}

    def make(sub, epochs):
        base = tiny_cfg()
        return tiny_cfg(optim={"epochs": epochs, "per_modality": groups, "scheduler": "step", "step_size": 1,
                               "gamma": 0.5},
                        runtime={**base.runtime.model_dump(), "output_dir": base.runtime.output_dir + sub})

    full = Trainer(make("/full", 3))
    full.fit()
    Trainer(make("/part", 1)).fit()
    resumed = Trainer(make("/part", 3))
    resumed.fit()
    assert resumed.start_epoch == 1
    for (name, a), b in zip(full.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    rows = [json.loads(line) for line in (make("/part", 3).run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_visual"] for r in rows] == pytest.approx([1e-3, 5e-4, 2.5e-4])  # each group's own schedule
    assert [r["lr_default"] for r in rows] == pytest.approx([0.05, 0.025, 0.0125])


@pytest.mark.parametrize("optim", [{"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4},
                                   {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-2}])
def test_fused_optimiser_kernels_update_as_the_per_tensor_ones(tiny_cfg, monkeypatch, optim):
    """The loop's optimisers use torch's fused kernels (speed, docs/BENCHMARKS.md §5); an epoch of CAL
    updates lands where the per-tensor kernels put it."""
    from calray.engine import optim as optim_module

    def epoch():
        trainer = Trainer(tiny_cfg(optim={**optim, "epochs": 1}))
        trainer.train_epoch(0)
        return trainer

    fused = epoch()
    assert all(g["fused"] for g in fused.optimizer.param_groups)
    monkeypatch.setattr(optim_module, "can_fuse", lambda params: False)
    per_tensor = epoch()
    assert not any(g["fused"] for g in per_tensor.optimizer.param_groups)
    for (name, a), b in zip(fused.raw_model.state_dict().items(), per_tensor.raw_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def sgd_run(params, grads_per_step, **kw) -> list[torch.Tensor]:
    """Apply the given gradients (None: that parameter has none in that step) with SGD, return the
    parameters after the last step."""
    from calray.engine.optim import prime_momentum

    ps = [torch.nn.Parameter(p.clone()) for p in params]
    primed = kw.pop("primed", False)
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, **kw)
    if primed:
        prime_momentum(opt)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach() for p in ps]


def test_primed_fused_sgd_is_torch_s_and_takes_a_late_first_gradient():
    """calray primes fused SGD's momentum buffers with zeros: bit for bit torch's fused SGD, and, unlike
    it, a parameter whose first gradient comes after other parameters' (a frozen encoder) is updated
    as torch's per-tensor SGD updates it."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g) for _ in range(3)]
    steps = [[torch.randn(5, 3, generator=g) for _ in params] for _ in range(4)]
    for a, b in zip(sgd_run(params, steps, fused=True, primed=True), sgd_run(params, steps, fused=True)):
        assert torch.equal(a, b)
    late = [[None if (i == 2 and t < 2) else x for i, x in enumerate(grads)] for t, grads in enumerate(steps)]
    with pytest.raises(TypeError):  # torch's fused kernel without priming
        sgd_run(params, late, fused=True)
    primed, per_tensor = sgd_run(params, late, fused=True, primed=True), sgd_run(params, late, foreach=False)
    for a, b in zip(primed, per_tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(primed[2], params[2])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_every_optimizer_s_parameters(tiny_cfg, set_to_none):
    cfg = tiny_cfg(optim={"name": "sgd", "lr": 0.01, "epochs": 1, "per_modality": {"visual": {"name": "adam"}}})
    trainer = Trainer(cfg)
    inputs, labels = next(iter(trainer.train_loader))
    trainer.train_step(inputs, labels, epoch=0, step=0, update=False)  # gradients accumulated, no step
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(trainer.optimizer.optimizers) == 2 and all(p.grad is not None for p in params)
    trainer.optimizer.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert all(p.grad is None for p in params)
    else:
        assert all(p.grad is not None and not p.grad.any() for p in params)
