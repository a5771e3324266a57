"""The method plug-in interface (calray.method.base): the loop calls every hook where it says it does,
so the baselines still to come fit it — a reweighted/extra loss term (Grad-Blending, PMR, QMF),
a per-step choice of terms (MLA), a backward of its own (MMPareto), epoch-end model edits and
held-out estimates (D&R, Grad-Blending), and state that survives a resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from calray.engine.trainer import Trainer
from calray.method.base import Method
from calray.method.plugins import create_methods


def add_plugin(trainer: Trainer, plugin_cls, **kwargs) -> Method:
    plugin = plugin_cls(trainer.cfg, trainer.modalities, None, **kwargs)
    trainer.methods.insert(1, plugin)  # between the strategy and the AIB
    return plugin


class Reweight(Method):
    """Grad-Blending-like: scale the fused term and add a named extra one."""

    def loss_terms(self, step, terms):
        return {**terms, "fused": 2.0 * terms["fused"], "extra": 0.5 * step.ce["audio"]}


class Alternate(Method):
    """MLA-like: even steps optimise audio's unimodal CE only, odd steps visual's."""

    def loss_terms(self, step, terms):
        m = self.modalities[step.step % 2]
        return {f"unimodal_{m}": step.ce[m]}


class ZeroBackward(Method):
    """MMPareto-like: computes the gradients itself (here: zeros) and tells the loop it did."""

    def backward(self, terms, model):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return True


class EpochEnd(Method):
    """D&R-like epoch-end edit plus a held-out estimate; a counter as checkpointed state."""

    def __init__(self, cfg, modalities, context):
        super().__init__(cfg, modalities, context)
        self.calls = 0

    def on_epoch_end(self, model, epoch, evaluate):
        self.calls += 1
        held_out = evaluate("val")["acc"]
        with torch.no_grad():
            for p in model.encoders["visual"].parameters():
                p.zero_()
        return {"plugin_val_acc_before_edit": held_out, "plugin_calls": self.calls}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def sgd_cfg(tiny_cfg, **optim):
    return tiny_cfg(method={"strategy": "none", "aib": "off"},
                    optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, **optim})


def test_the_default_plugins_are_the_strategy_then_the_aib(tiny_cfg):
    trainer = Trainer(tiny_cfg(method={"strategy": "weak"}))
    assert [type(m).__name__ for m in trainer.methods] == ["Weak", "AsymmetricIB"]
    assert trainer.strategy is trainer.methods[0] and trainer.aib is trainer.methods[-1]
    built = create_methods(trainer.cfg, trainer.modalities, trainer.methods[0].context)
    assert [type(m).__name__ for m in built] == ["Weak", "AsymmetricIB"]


def test_loss_terms_hook_edits_what_is_optimised(tiny_cfg):
    trainer = Trainer(sgd_cfg(tiny_cfg))
    add_plugin(trainer, Reweight)
    inputs, y = next(iter(trainer.train_loader))
    with torch.no_grad():
        out = trainer.raw_model(inputs)
    ce = {m: F.cross_entropy(v, y) for m, v in out.unimodal_logits.items()}
    expected = 2.0 * F.cross_entropy(out.fused_logits, y) + sum(ce.values()) + 0.5 * ce["audio"]
    loss = trainer.train_step(inputs, y, epoch=0, step=0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_a_per_step_choice_of_terms_updates_one_branch_at_a_time(tiny_cfg):
    trainer = Trainer(sgd_cfg(tiny_cfg))
    add_plugin(trainer, Alternate)
    model = trainer.raw_model
    batches = iter(trainer.train_loader)
    for step, moved, still in ((0, "audio", "visual"), (1, "visual", "audio")):
        before = {m: [p.detach().clone() for p in model.encoders[m].parameters()] for m in ("audio", "visual")}
        inputs, y = next(batches)
        trainer.train_step(inputs, y, epoch=0, step=step)
        changed = {m: any(not torch.equal(p, b) for p, b in zip(model.encoders[m].parameters(), before[m]))
                   for m in before}
        assert changed[moved] and not changed[still], step


def test_a_plugin_may_run_the_backward_itself(tiny_cfg):
    trainer = Trainer(sgd_cfg(tiny_cfg))
    add_plugin(trainer, ZeroBackward)
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    inputs, y = next(iter(trainer.train_loader))
    trainer.train_step(inputs, y, epoch=0, step=0)
    assert all(torch.equal(p, b) for p, b in zip(trainer.raw_model.parameters(), before))  # zero gradients


def test_epoch_end_hook_edits_the_model_logs_and_resumes(tiny_cfg):
    cfg = sgd_cfg(tiny_cfg, epochs=1)
    trainer = Trainer(cfg)
    plugin = add_plugin(trainer, EpochEnd)
    trainer.fit()
    row = json.loads((cfg.run_dir() / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["plugin_calls"] == 1 and 0.0 <= row["plugin_val_acc_before_edit"] <= 1.0
    # validation ran on the edited model: with the visual encoder zeroed it is the audio-only prediction
    assert row["val_acc"] == pytest.approx(row["val_acc_audio"])
    assert all(float(p.detach().abs().sum()) == 0.0 for p in trainer.raw_model.encoders["visual"].parameters())
    assert plugin.calls == 1
    resumed = Trainer(sgd_cfg(tiny_cfg, epochs=2))
    again = add_plugin(resumed, EpochEnd)
    resumed.fit()
    assert resumed.start_epoch == 1 and again.calls == 2  # the counter came back from the checkpoint
