"""Ray Train with 2 workers vs 1 process × the global batch for the Table I baselines of H2 (issue 15):
MMPareto, MLA and D&R. One module-scoped local Ray instance; each case is one
`python -m calray.train CFG --workers 2` run (in-process main) of 2 epochs × 4 steps of B/2 per worker,
compared with one process at batch B (tests/test_distributed.py's pattern).

MMPareto and MLA run their own backward (torch.autograd.grad; `own_backward`): the trainer keeps DDP's
reducer out of it (`no_sync`) and the plug-in averages the gradients over ranks before the cosines /
projections are computed, so the two runs agree. D&R gathers the encoders' features of the train and
validation splits from both ranks before clustering, so both re-initialise with the same α."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from calray.config import config_from_dict
from tests.test_distributed import B, assert_params_close, dist_tree, params_of, rows_of

CASES = {
    "mmpareto": {  # the reference's architecture: concat head + separate unimodal heads
        "model": {"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}},
                  "unimodal_head": "separate"},
        "method": {"strategy": "mmpareto", "aib": "off", "unimodal_weight": 1.0},
    },
    "mla": {
        "model": {"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}},
                  "fusion": "mla"},
        "method": {"strategy": "mla", "aib": "off"},
    },
    "dr": {
        "model": {"encoders": {"audio": {"name": "mlp", "hidden": [32]}, "visual": {"name": "mlp", "hidden": [32]}}},
        "method": {"strategy": "dr", "aib": "off", "unimodal_weight": 0, "params": {"reinit_epoch": 1}},
    },
}


def case_tree(tmp: Path, out: str, case: str, batch: int) -> dict:
    tree = dist_tree(tmp, out, batch=batch, epochs=2)
    tree["model"] = CASES[case]["model"]
    tree["method"] = {**CASES[case]["method"], "n": 2}
    tree["distributed"]["check_consistency"] = False  # nothing steers on W here; the params are compared
    return tree



def two_workers_vs_one_process(tmp: Path, case: str) -> tuple[list[dict], list[dict]]:
    from calray.engine.trainer import train
    from calray.train import main

    path = tmp / f"{case}.yaml"
    path.write_text(yaml.safe_dump(case_tree(tmp, f"{case}_dist", case, B // 2)))
    assert main([str(path), "--workers", "2"]) == 0
    dist_dir = tmp / f"{case}_dist" / "tiny"
    ref = config_from_dict(case_tree(tmp, f"{case}_single", case, B), case)
    train(ref)
    assert_params_close(params_of(dist_dir), params_of(ref.run_dir()))
    d_rows, s_rows = rows_of(dist_dir / "metrics.jsonl"), rows_of(ref.run_dir() / "metrics.jsonl")
    for d, s in zip(d_rows, s_rows, strict=True):
        for key in s:
            if key.startswith(("train_loss", "val_", case.split("_")[0])):
                assert d[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), key
    summary = json.loads((dist_dir / "summary.json").read_text())
    assert summary["test"]["n"] == 96
    return d_rows, s_rows


def test_mmpareto_two_workers_match_one_process(ray_local, tmp_path):
    rows, _ = two_workers_vs_one_process(tmp_path, "mmpareto")
    # the Pareto branch ran in the compared updates (not only the ½/½ one)
    assert any(r["mmpareto_conflict_audio"] + r["mmpareto_conflict_visual"] > 0 for r in rows)


def test_mla_two_workers_match_one_process(ray_local, tmp_path):
    """The projector is updated from the GLOBAL batch mean of each modality's embedding, and the
    per-modality gradients are averaged over the ranks: the 2-worker run is the 1-process run."""
    two_workers_vs_one_process(tmp_path, "mla")


def test_dr_two_workers_match_one_process(ray_local, tmp_path):
    """The re-initialisation after epoch 1 clusters the gathered features of both shards: both ranks and
    the single process find the same purities and α, and end with the same parameters."""
    rows, ref_rows = two_workers_vs_one_process(tmp_path, "dr")
    assert rows[1]["dr_reinits"] == 1.0 and 0.0 < rows[1]["dr_alpha_audio"] < 1.0
    assert rows[1]["dr_purity_val_visual"] == ref_rows[1]["dr_purity_val_visual"]
