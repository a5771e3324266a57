"""Ray Train (2 CPU workers, gloo) runs of the joint encoders MMTM (NYUD2 fixture) and MMBT (MVSA
fixture): 2 workers × batch b give the parameters and metrics of 1 process × batch 2b.

Both models contain ResNets, whose BatchNorm normalises each worker's shard by its own statistics
(sync_bn is CUDA-only). The fixtures' images are therefore rewritten as ONE textured, left-right
symmetric image for every sample (64 px, no crop: NYUD2's random flip is then a no-op), so every
shard has the global batch statistics and the runs must agree up to float rounding; what is checked is the DDP path of the joint encoders (gradients of
the transfer modules / the bitransformer all-reduced, contributions all-reduced). BERT's dropout
is off, SGD (Adam's first step amplifies rounding to ±lr)."""

from __future__ import annotations

import json

import pytest
import torch

from calray.config import load_config
import numpy as np
from PIL import Image

from calray.engine.checkpoint import load_checkpoint
from tests.test_data_e2e import CONFIGS, TINY_BERT, fixture_overrides

REL_UPDATE_TOL = 0.05
B = 6  # global batch: the fixtures' 6 training samples; each worker takes 3



def overrides(layout: str, tmp, out: str, batch: int) -> dict:
    ov = fixture_overrides(layout, tmp)
    ov.update({"data.batch_size": batch, "optim.epochs": 2, "optim.name": "sgd", "optim.lr": 0.01,
               "optim.momentum": 0.9, "optim.grad_accum": 1, "optim.scheduler": "none",
               "runtime.output_dir": str(tmp / out), "runtime.seed": 0, "runtime.max_steps_per_epoch": 1,
               "distributed.check_consistency": True, "distributed.collective_timeout_s": 120})
    return ov


def params_of(run_dir) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    return {k: v for k, v in state.items() if not k.startswith("emb_mean")}


def rows_of(run_dir) -> list[dict]:
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]


def assert_equivalent(config_name: str, layout: str, tmp, extra: dict, edit_fixture=None) -> None:
    from calray.engine.trainer import train
    from calray.ray.distributed import train_distributed

    dist_ov, single_ov = overrides(layout, tmp, "dist", B // 2), overrides(layout, tmp, "single", B)
    if edit_fixture is not None:  # after the fixture is (re)written
        edit_fixture(tmp)
    dist = load_config(CONFIGS / config_name, {**dist_ov, **extra, "distributed.workers": 2})
    single = load_config(CONFIGS / config_name, {**single_ov, **extra})
    summary = train_distributed(dist)
    assert summary["distributed"]["workers"] == 2 and summary["epochs_run"] == 2
    train(single)
    for d, s in zip(rows_of(dist.run_dir()), rows_of(single.run_dir()), strict=True):
        for key in s:
            if key.startswith(("train_loss", "val_acc", "val_loss", "W_", "a_")):
                assert np.isfinite(s[key]), key
                assert d[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), key
    a, b = params_of(dist.run_dir()), params_of(single.run_dir())
    init = initial_params(single)
    assert a.keys() == b.keys() == init.keys()
    # BatchNorm couples the samples of a shard in its backward pass (the labels differ per shard), so
    # the updates agree to BN's coupling, not to rounding: each tensor's update θ_T − θ_0 within a
    # few per cent of the 1-process one (an unsynchronised gradient is off by O(1))
    deltas = {k: (a[k].double() - init[k].double(), b[k].double() - init[k].double()) for k in a
              if a[k].is_floating_point() and "running" not in k}
    # (attention key biases get no gradient at all — softmax ignores a constant shift — only rounding)
    worst = max((float((d - s).norm() / s.norm()), k) for k, (d, s) in deltas.items() if float(s.norm()) > 1e-6)
    print("worst relative update difference", worst)
    assert worst[0] < REL_UPDATE_TOL, worst
    fusion = [k for k in deltas if k.startswith("fusion.") and float(deltas[k][1].norm()) > 0]
    assert fusion, "the joint fusion's own parameters did not move"


def initial_params(cfg) -> dict[str, torch.Tensor]:
    """θ_0 as the Trainer builds it (calray.engine.trainer: manual_seed(seed), then build_model)."""
    from calray.data.base import build_datasets
    from calray.models import build_model

    splits = build_datasets(cfg)
    torch.manual_seed(cfg.runtime.seed)
    return {k: v for k, v in build_model(cfg, splits).state_dict().items() if not k.startswith("emb_mean")}

def symmetric_texture(h: int, w: int, seed: int) -> np.ndarray:
    half = np.random.default_rng(seed).integers(0, 256, (h, w // 2, 3), dtype=np.uint8)
    return np.concatenate([half, half[:, ::-1]], axis=1)


def one_image(tmp) -> None:
    """The same image for every sample: BatchNorm's per-shard statistics are the global ones."""
    for png in (tmp / "nyud2").rglob("*.png"):  # RGB | depth side by side
        Image.fromarray(np.concatenate([symmetric_texture(64, 64, 0), symmetric_texture(64, 64, 1)], 1)).save(png)
    for jpg in (tmp / "mvsa" / "data").glob("*.jpg"):
        Image.fromarray(symmetric_texture(64, 64, 2)).save(jpg)


def test_mmtm_two_workers_match_one_process(ray_local, tmp_path):
    assert_equivalent("nyud2_mmtm.yaml", "nyud2", tmp_path, {"method.strategy": "cal", "data.params.image_size": 64,
                                                              "data.params.load_size": 64}, one_image)


def test_mmbt_two_workers_match_one_process(ray_local, tmp_path):
    bert = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    # the freeze schedule holds the ResNet and BERT's layers in the first of the two epochs, on every rank
    assert_equivalent("mvsa_mmbt.yaml", "mvsa", tmp_path, {"model.encoders.text.bert_config": bert,
                                                            "data.params.image_size": 64, "data.params.resize_size": 64,
                                                            "model.fusion_params.freeze_image_epochs": 1,
                                                            "model.fusion_params.freeze_text_epochs": 1},
                      one_image)
