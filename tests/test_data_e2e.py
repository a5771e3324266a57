"""End to end: the shipped configs/<dataset>.yaml train one epoch on a tiny fixture of each real layout,
clean and under an attack (tiny images and spectrograms, random-init encoders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calray.config import load_config
from calray.engine.trainer import Trainer, train
from tests.fixtures_data import make_ave, make_cremad, make_ks, make_mvsa, make_nyud2, make_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_SPEC = {"sample_rate": 8000, "seconds": 0.5, "n_fft": 64, "hop": 64}  # 33×63 instead of 257×188
TINY_BERT = {"vocab_size": 20, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": 32}


def fixture_overrides(name: str, tmp: Path) -> dict:
    root = tmp / name
    common = {"data.root": str(root), "data.batch_size": 4, "data.num_workers": 0, "data.cache_dir": str(tmp / "cache"),
              "optim.epochs": 1, "runtime.output_dir": str(tmp / "runs"), "runtime.progress": False,
              "runtime.device": "cpu"}
    if name == "cremad":
        make_cremad(root, train_per_class=2, frames=3)
        return {**common, "data.params.image_size": 16, "data.params.frames": 2, "data.params.spectrogram": TINY_SPEC}
    if name in ("ks", "ave"):
        (make_ks if name == "ks" else make_ave)(root, spec_shape=(33, 20), frames=3)
        return {**common, "data.params.image_size": 16, "data.params.frames": 2}
    if name == "nyud2":
        make_nyud2(root)
        return {**common, "data.params.image_size": 16, "data.params.load_size": 20,
                "model.encoders.rgb.weights": None, "model.encoders.depth.weights": None}
    make_mvsa(root)
    tok = make_tokenizer(tmp / "tokenizer")
    return {**common, "data.params.tokenizer": str(tok), "data.params.max_length": 16, "data.params.image_size": 16,
            "data.params.resize_size": 20, "model.encoders.image": {"name": "resnet18", "in_channels": 3},
            "model.encoders.text": {"name": "bert", "bert_config": TINY_BERT}}


ATTACKS = {  # both kinds and both modes are covered across the five sets
    "cremad": {"kind": "gaussian", "eps": 5, "mode": "test"},
    "ks": {"kind": "salt_pepper", "eps": 10, "mode": "train+test"},
    "ave": {"kind": "gaussian", "eps": 10, "mode": "train+test"},
    "nyud2": {"kind": "salt_pepper", "eps": 5, "mode": "test"},
    "mvsa": {"kind": "gaussian", "eps": 10, "mode": "train+test"},
}


@pytest.mark.parametrize("attacked", [False, True], ids=["clean", "attacked"])
@pytest.mark.parametrize("name", ["cremad", "ks", "ave", "nyud2", "mvsa"])
def test_config_trains_one_epoch(tmp_path, name, attacked):
    overrides = fixture_overrides(name, tmp_path)
    if attacked:
        overrides.update({f"noise.{k}": v for k, v in ATTACKS[name].items()})
    cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
    summary = train(cfg)
    assert 0.0 <= summary["test_acc"] <= 1.0
    info = json.loads((cfg.run_dir() / "data_info.json").read_text())
    noise = info["noise"]
    assert noise["test"]["active"] is attacked
    assert noise["train"]["active"] is (attacked and ATTACKS[name]["mode"] == "train+test")


@pytest.mark.parametrize("preset,layout", [("nyud2_paper", "nyud2"), ("mvsa_paper", "mvsa")])
def test_paper_optimiser_presets_train_one_epoch(tmp_path, preset, layout):
    """configs/<set>_paper.yaml: the paper's SGD for images (and Adam for text) as optimiser groups."""
    cfg = load_config(CONFIGS / f"{preset}.yaml", fixture_overrides(layout, tmp_path))
    trainer = Trainer(cfg)
    kinds = {type(o).__name__ for o in trainer.optimizer.optimizers}
    assert kinds == ({"SGD", "Adam"} if layout == "mvsa" else {"SGD"})
    summary = trainer.fit()
    assert 0.0 <= summary["test_acc"] <= 1.0
    warnings = json.loads((cfg.run_dir() / "env.json").read_text())["warnings"]
    assert [("'text'" in w) for w in warnings] == ([True] if layout == "mvsa" else [])
