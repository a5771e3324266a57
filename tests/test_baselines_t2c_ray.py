"""Ray Train (2 CPU workers, gloo) run of EAU (Tables II–III) against one process with twice the batch:
the same parameters and logged losses. EAU draws reparameterisation noise and dropout masks for the
global batch (each rank keeps its interleaved rows), pairs every sample with the whole batch in its
contrastive term and scales the branch gradients by an all-reduced uncertainty, so this checks all three.
The reference head's BatchNorm is off (with it on, `distributed.workers > 1` is refused:
tests/test_baseline_eau.py). `align` has no plug-in (docs/baselines/align.md). One module-scoped local
Ray instance, as tests/test_distributed.py."""

from __future__ import annotations

import pytest
import yaml

from calray.config import config_from_dict
from tests.conftest import tiny_run_dict
from tests.test_distributed import B, assert_params_close, dist_tree, params_of, rows_of

MODEL = {"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}},
         "fusion": "eau", "fusion_params": {"batchnorm": False}}  # dropout 0.211 stays on
METHOD = {"strategy": "eau", "aib": "off", "unimodal_weight": 0,
          "params": {"modulation_start": 0, "zeta": 5.0, "contrastive_weight": 1.0}}



def tree_for(tmp, out: str, batch: int) -> dict:
    tree = dist_tree(tmp, out, batch=batch, epochs=2, model=MODEL, method=METHOD)
    tree["data"] = {**tiny_run_dict(tmp)["data"], "batch_size": batch}
    return tree


def test_eau_two_workers_match_one_process_with_twice_the_batch(ray_local, tmp_path):
    from calray.engine.trainer import train
    from calray.train import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree_for(tmp_path, "dist", B // 2)))
    assert main([str(path), "--workers", "2"]) == 0
    ref = config_from_dict(tree_for(tmp_path, "single", B), "single")
    train(ref)
    dist_rows, ref_rows = rows_of(tmp_path / "dist" / "tiny" / "metrics.jsonl"), rows_of(ref.run_dir() / "metrics.jsonl")
    for d, s in zip(dist_rows, ref_rows, strict=True):
        for key in s:
            if key.startswith(("train_", "val_", "eau_")) and key != "train_time_s":
                assert d[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), key
    assert all(ref_rows[1][f"eau_scale_{m}"] > 1.001 for m in ("audio", "visual"))  # the modulation acted
    assert_params_close(params_of(tmp_path / "dist" / "tiny"), params_of(ref.run_dir()))
