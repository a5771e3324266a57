"""The Bert (text only) and ConcatBert rows of Tables II–III as configs (configs/mvsa_bert.yaml,
configs/mvsa_concatbert.yaml): each trains on the MVSA fixture through the CLI with a tiny random
BERT, and its model is what the config says (the fused CE of a linear head on [CLS] / on [CLS ‖ image])."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from calray.config import load_config, save_config
from calray.engine.trainer import Trainer
from calray.train import main
from tests.test_data_e2e import CONFIGS, TINY_BERT, fixture_overrides

NO_DROPOUT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def config(name, tmp_path, **extra):
    ov = fixture_overrides("mvsa", tmp_path)
    if name == "mvsa_bert":
        ov.pop("model.encoders.image")
    ov.update({"model.encoders.text.bert_config": NO_DROPOUT, **extra})
    return load_config(CONFIGS / f"{name}.yaml", ov)


@pytest.mark.parametrize("name,modalities", [("mvsa_bert", ["text"]), ("mvsa_concatbert", ["image", "text"])])
def test_config_runs_from_the_cli(tmp_path, name, modalities):
    cfg = config(name, tmp_path, **{"runtime.max_steps_per_epoch": 2})
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    assert main([str(path)]) == 0
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert summary["modalities"] == modalities and summary["test"]["n"] == 3
    assert set(summary["test"]) >= {f"acc_{m}" for m in modalities}
    resolved = load_config(cfg.run_dir() / "config.yaml")
    assert (resolved.optim.name, resolved.optim.scheduler, resolved.optim.weight_decay) == ("adamw", "linear_warmup", 0.01)
    assert resolved.method.strategy == "none" and resolved.method.unimodal_weight == 0.0


@pytest.mark.parametrize("name", ["mvsa_bert", "mvsa_concatbert"])
def test_one_step_is_the_fused_ce_of_a_linear_head_on_the_embeddings(tmp_path, name):
    trainer = Trainer(config(name, tmp_path, **{"optim.grad_accum": 1}))
    model = trainer.raw_model
    inputs, labels = next(iter(trainer.train_loader))
    start = copy.deepcopy(model)
    loss = trainer.train_step(inputs, labels, epoch=0, step=0)
    with torch.no_grad():
        cls = start.encoders["text"].net(**inputs["text"]).last_hidden_state[:, 0]
        parts = [start.encoders["image"](inputs["image"]), cls] if name == "mvsa_concatbert" else [cls]
        logits = F.linear(torch.cat(parts, dim=1), start.fusion.head.weight, start.fusion.head.bias)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    width = 16 + (512 if name == "mvsa_concatbert" else 0)  # [CLS] (16) ‖ resnet18 pooled (512)
    assert model.fusion.head.in_features == width
