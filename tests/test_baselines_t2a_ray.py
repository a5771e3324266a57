"""Ray Train (2 CPU workers, gloo) runs of the Tables II–III robust-fusion baselines (tmc, qmf) against
one process with twice the batch: the same parameters and logged losses. QMF's ranking term pairs
samples across the whole batch and keeps a per-sample history, so this checks its global gather
(confidences, indices, losses in the single-process order) and its gradient scaling.
One module-scoped local Ray instance, as tests/test_distributed.py."""

from __future__ import annotations

import pytest
import yaml

from calray.config import config_from_dict
from tests.conftest import tiny_run_dict
from tests.test_distributed import B, assert_params_close, dist_tree, params_of, rows_of

MODEL = {"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}}}
CASES = {
    "tmc": ({**MODEL, "fusion": "tmc"}, {"strategy": "tmc", "aib": "off", "params": {"annealing_epochs": 1}}),
    # conf_scale 5: confidence gaps beyond the history margins, so the ranking hinge is active
    "qmf": ({**MODEL, "fusion": "qmf", "fusion_params": {"conf_scale": 5.0}},
            {"strategy": "qmf", "aib": "off", "params": {"rank_weight": 1.0}}),
}



def tree_for(tmp, out: str, name: str, batch: int) -> dict:
    model, method = CASES[name]
    tree = dist_tree(tmp, out, batch=batch, epochs=2, model=model, method=method)
    tree["data"] = {**tiny_run_dict(tmp)["data"], "batch_size": batch}
    return tree


@pytest.mark.parametrize("name", list(CASES))
def test_two_workers_match_one_process_with_twice_the_batch(ray_local, tmp_path, name):
    from calray.engine.trainer import train
    from calray.train import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree_for(tmp_path, "dist", name, B // 2)))
    assert main([str(path), "--workers", "2"]) == 0
    ref = config_from_dict(tree_for(tmp_path, "single", name, B), "single")
    train(ref)
    dist_rows, ref_rows = rows_of(tmp_path / "dist" / "tiny" / "metrics.jsonl"), rows_of(ref.run_dir() / "metrics.jsonl")
    for d, s in zip(dist_rows, ref_rows, strict=True):
        for key in s:
            if key.startswith(("train_", "val_")) and key != "train_time_s":
                assert d[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), key
    if name == "qmf":  # the ranking term acted (epoch 1 meets samples of epoch 0 again)
        assert ref_rows[1]["train_rank_audio"] > 0 and ref_rows[1]["train_rank_visual"] > 0
    assert_params_close(params_of(tmp_path / "dist" / "tiny"), params_of(ref.run_dir()))
