"""End-to-end: every strategy / contribution variant / space / φ ablation / AIB mode / update_every /
warm-up runs from YAML, and the logged per-epoch quantities obey eq 9, 10, 1, 12 and 17 when
recomputed by hand (numpy) from the other logged columns."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calray.engine.checkpoint import load_checkpoint
from calray.config import MethodConfig, load_config, save_config
from calray.registry import AIB_MODES, CONTRIBUTIONS, STRATEGIES
from calray.train import main as train_main
from calray.engine.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
MODS = ("audio", "visual")
KEYS = ("W", "D", "I", "phi", "R", "P", "kl", "a", "beta")




def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def np_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def check_rows(rows: list[dict], method) -> None:
    """Recompute R, D, W, a and β from the logged P, φ, I, KL and W of each epoch."""
    hist = {m: [r[f"P_{m}"] for r in rows] for m in MODS}
    for t, row in enumerate(rows):
        for key in KEYS:
            for m in MODS:
                assert math.isfinite(row[f"{key}_{m}"]), f"{key}_{m} at epoch {t}"
        for m in MODS:
            past = hist[m][max(t - method.n, 0)]
            r = (hist[m][t] - past) / max(past, 1e-8)
            assert row[f"R_{m}"] == pytest.approx(r, abs=1e-9)
            d = row[f"phi_{m}"] * r
            assert row[f"D_{m}"] == pytest.approx(d, rel=1e-9, abs=1e-12)
            w = {"d_x_i": d * row[f"I_{m}"], "d_plus_i": d + row[f"I_{m}"], "d_only": d,
                 "i_only": row[f"I_{m}"], "kl": -row[f"kl_{m}"]}[method.contribution]
            assert row[f"W_{m}"] == pytest.approx(w, rel=1e-9, abs=1e-12)
            assert 0.0 < row[f"P_{m}"] < 1.0 and row[f"I_{m}"] >= 0.0 and row[f"kl_{m}"] >= -1e-9
        if t == 0:
            assert all(row[f"R_{m}"] == 0.0 for m in MODS)
        w = [row[f"W_{m}"] for m in MODS]
        a = [row[f"a_{m}"] for m in MODS]
        expected_a = {"cal": np_softmax(method.T * np.array(w)), "weak": np_softmax(-method.T * np.array(w)),
                      "null": [0.5, 0.5], "none": [0.0, 0.0], "ogm_ge": [0.0, 0.0],
                      "ogm_ge_mix": [0.0, 0.0], "agm": [0.0, 0.0], "arl": [0.0, 0.0], "pmr": [0.0, 0.0], "gblending": [0.0, 0.0], "tmc": [0.0, 0.0],
                      "qmf": [0.0, 0.0], "mmpareto": [0.0, 0.0], "mla": [0.0, 0.0], "dr": [0.0, 0.0], "eau": [0.0, 0.0]}[method.strategy]
        assert np.allclose(a, expected_a, atol=1e-12)
        # AIB's β uses softmax(T·W) whatever the gradient strategy (eq 17 on normalised a)
        assert np.allclose([row[f"beta_{m}"] for m in MODS], 1.0 - np_softmax(method.T * np.array(w)), atol=1e-12)


CASES = {
    "cal": {},
    "null": {"strategy": "null"},
    "weak": {"strategy": "weak"},
    "ogm_ge": {"strategy": "ogm_ge", "aib": "off", "unimodal_weight": 0},  # as published: fused CE only
    "ogm_no_noise": {"strategy": "ogm_ge", "aib": "off", "unimodal_weight": 0, "ogm_ge_noise": False},
    "ogm_ge_mix": {"strategy": "ogm_ge_mix"},  # OGM-GE's modulation inside CAL's loss (AIB on)
    "agm": {"strategy": "agm", "aib": "off", "unimodal_weight": 0},  # docs/baselines/agm.md
    "arl": {"strategy": "arl", "aib": "off", "params.start": 0},  # docs/baselines/arl.md
    "pmr": {"strategy": "pmr", "aib": "off", "unimodal_weight": 0},  # docs/baselines/pmr.md
    "gblending": {"strategy": "gblending", "aib": "off", "params.super_epoch": 1},  # docs/baselines/gblending.md
    "tmc": {"strategy": "tmc", "aib": "off", "model.fusion": "tmc"},  # docs/baselines/tmc.md
    "qmf": {"strategy": "qmf", "aib": "off", "model.fusion": "qmf"},  # docs/baselines/qmf.md
    "eau": {"strategy": "eau", "aib": "off", "unimodal_weight": 0, "model.fusion": "eau"},  # docs/baselines/eau.md
    "mmpareto": {"strategy": "mmpareto", "aib": "off", "model.unimodal_head": "separate"},  # docs/baselines/mmpareto.md
    "mla": {"strategy": "mla", "aib": "off", "model.fusion": "mla"},  # docs/baselines/mla.md
    "dr": {"strategy": "dr", "aib": "off", "unimodal_weight": 0, "params.reinit_epoch": 1},  # docs/baselines/dr.md
    "none": {"strategy": "none"},
    "d_plus_i": {"contribution": "d_plus_i"},
    "d_only": {"contribution": "d_only"},
    "i_only": {"contribution": "i_only", "T": 0.5},
    "kl": {"contribution": "kl"},
    "embeddings": {"contribution_space": "embeddings"},
    "embeddings_no_aib": {"contribution_space": "embeddings", "aib": "off"},
    "mean_ablation": {"phi_ablation": "mean"},
    "inv_beta": {"aib": "inv_beta"},
    "mi": {"aib": "mi"},
    "mx": {"aib": "mx"},
    "mx_mi": {"aib": "mx_mi"},
    "aib_off": {"aib": "off"},
    "update_every": {"update_every": 3},
    "warmup": {"warmup_epochs": 1, "latent_dim": 8},
}


def test_cases_cover_every_registered_name():
    """A newly registered strategy, contribution variant or AIB mode must get a case here."""
    defaults = MethodConfig()
    for registry, key in ((STRATEGIES, "strategy"), (CONTRIBUTIONS, "contribution"), (AIB_MODES, "aib")):
        covered = {case.get(key, getattr(defaults, key)) for case in CASES.values()}
        assert set(registry.names()) <= covered, f"{key}: no case for {set(registry.names()) - covered}"


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_option_runs_from_yaml(case, tiny_cfg, tmp_path):
    cfg = tiny_cfg(name=f"m_{case}")
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    sets = [f"{k}={v}" if k.startswith("model.") else f"method.{k}={v}" for k, v in CASES[case].items()]
    assert train_main([str(path), *[a for s in sets for a in ("--set", s)]]) == 0
    run_cfg = load_config(path, sets)
    run_dir = run_cfg.run_dir()
    rows = rows_of(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1]
    check_rows(rows, run_cfg.method)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["test_acc"] <= 1.0
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    has_aib = any(k.startswith("aib_heads.") for k in state)
    assert has_aib == (run_cfg.method.aib != "off")
    if run_cfg.method.latent_dim:
        assert state["aib_heads.audio.params.weight"].shape[0] == 2 * run_cfg.method.latent_dim


def test_untracked_plain_run_logs_no_contributions(tiny_cfg):
    cfg = tiny_cfg(name="plain", method={"strategy": "none", "aib": "off", "track_contributions": False})
    train(cfg)
    rows = rows_of(cfg.run_dir())
    assert len(rows) == 2 and not any(k.startswith(("W_", "a_", "beta_")) for k in rows[0])
    with pytest.raises(Exception):
        tiny_cfg(method={"strategy": "cal", "track_contributions": False})


def final_weights(summary: dict) -> dict:
    return load_checkpoint(Path(summary["run_dir"]) / "checkpoints" / "last.pt")["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_modulation_is_applied_exactly_when_configured(tiny_cfg):
    """Wiring check against plain joint training (`none`, same seed): a strategy that modulates
    nothing (cal with warm-up over every epoch, cal with η = 0, OGM-GE's modulation outside its
    epoch window, `ogm_ge_mix`: the same loss as `none`) trains to bit-identical weights; cal after
    one warm-up epoch, null and `ogm_ge_mix` inside its window do not."""
    base = final_weights(train(tiny_cfg(name="none", method={"strategy": "none"})))
    same = {
        "warm": {"strategy": "cal", "warmup_epochs": 2},
        "eta0": {"strategy": "cal", "eta": 0.0},
        "ogm_outside": {"strategy": "ogm_ge_mix", "ogm_epochs": [5, 9]},
    }
    for name, method in same.items():
        assert same_weights(final_weights(train(tiny_cfg(name=name, method=method))), base), name
    differ = {"warm1": {"strategy": "cal", "warmup_epochs": 1}, "null": {"strategy": "null"},
              "ogm_inside": {"strategy": "ogm_ge_mix", "ogm_ge_noise": False}}
    for name, method in differ.items():
        assert not same_weights(final_weights(train(tiny_cfg(name=name, method=method))), base), name


def test_update_every_refreshes_within_the_epoch(tiny_cfg):
    cfg = tiny_cfg(name="upd", method={"update_every": 3}, optim={"epochs": 1})
    trainer = Trainer(cfg)
    calls = []
    original = trainer.strategy.on_contributions

    def spy(w):
        calls.append(dict(w))
        return original(w)

    trainer.strategy.on_contributions = spy
    trainer.fit()
    steps = len(trainer.train_loader)
    assert steps >= 6
    assert len(calls) == steps // 3 + 1  # every 3 steps, plus the end of the epoch
    assert len(trainer.monitor.tracker.history["audio"]) == 1  # only the epoch-end refresh is recorded


def test_synthetic_task_phi_and_info_larger_for_dominant_modality(tmp_path):
    """configs/quickstart.yaml: `audio` (strength 1.0) dominates `visual` (0.35)."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      ["optim.epochs=4", "runtime.progress=false", f"runtime.output_dir={tmp_path}"])
    train(cfg)
    rows = rows_of(cfg.run_dir())
    check_rows(rows, cfg.method)
    for row in rows:
        assert row["phi_audio"] > row["phi_visual"] + 0.1, row["epoch"]
        assert row["I_audio"] > row["I_visual"], row["epoch"]
    assert rows[-1]["phi_audio"] > 0.3
    assert rows[-1]["val_acc_audio"] > rows[-1]["val_acc_visual"]


def test_cli_subprocess(tmp_path):
    """`python -m calray.train CONFIG --set ...` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "calray.train", str(ROOT / "configs" / "quickstart.yaml"),
           "--set", f"runtime.output_dir={tmp_path}", "--set", "runtime.progress=false",
           "--set", "optim.epochs=1", "--set", "data.params.n_train=200", "--set", "method.strategy=weak",
           "--set", "method.aib=mx_mi"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = rows_of(tmp_path / "quickstart")
    assert len(rows) == 1 and "a_visual" in rows[0] and "beta_audio" in rows[0]



def test_cli_rejects_unknown_strategy(capsys):
    assert train_main([str(ROOT / "configs" / "quickstart.yaml"), "--set", "method.strategy=strong"]) == 2
    assert "method.strategy" in capsys.readouterr().err
