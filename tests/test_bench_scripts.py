"""The benchmark scripts stay runnable: tiny in-process runs and the sweep files they generate.
(Their timings are never asserted: speed is a benchmark, not a test.)"""

import importlib
import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from calray.sweep.spec import load_sweep
from tests.conftest import tiny_run_dict

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield {name: importlib.import_module(f"bench_{name}") for name in ("step", "sweep", "loader", "unimodal_grad")}
    finally:
        sys.path.remove(str(SCRIPTS))


def test_bench_step_on_a_run_config_writes_ratios(bench, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny_run_dict(tmp_path)))
    out = tmp_path / "step.json"
    assert bench["step"].main(["--run-config", str(run), "--variants", "plain", "cal", "--rounds", "1",
                               "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["run_config"] == str(run) and result["batch"] == 32
    assert set(result["ratio_to_plain"]) == {"plain", "cal"} and result["ratio_to_plain"]["plain"] == 1.0
    assert result["samples_per_s"]["cal"] > 0 and result["env"]["torch_threads"] == 1
    assert "× plain" in capsys.readouterr().out


@pytest.mark.parametrize("variant,peer", [("plain", "pytorch"), ("plain", "pytorch_fused"),
                                          ("cal_aib", "pytorch_aib")])
def test_hand_written_peers_compute_calrays_loss(bench, tmp_path, variant, peer):
    """The peers time the same model and loss as calray's step: their first loss on the same batch, from
    the same weights and the same reparameterisation noise, is calray's (the AIB one: the same as a
    `cal_aib` step before any refresh, a uniform, so β = ½)."""
    import torch

    b = bench["step"]
    trainer = b.make_trainer("mlp", variant, "cpu", False, tmp_path, latent_dim=8)
    hand = b.HandWrittenStep(b.make_trainer("mlp", peer, "cpu", False, tmp_path, latent_dim=8), fused=True)
    hand.encoders.load_state_dict({k.replace("net.", ""): v for k, v in
                                   {f"{i}.{n}": t for i, m in enumerate(trainer.modalities)
                                    for n, t in trainer.raw_model.encoders[m].state_dict().items()}.items()})
    hand.head.load_state_dict(trainer.raw_model.fusion.head.state_dict())
    for i, m in enumerate(trainer.modalities if len(hand.aib) else []):
        hand.aib[i].load_state_dict(trainer.raw_model.aib_heads[m].params.state_dict())
    inputs, labels = next(iter(trainer.train_loader))
    trainer.model.train()
    torch.manual_seed(3)
    ours = float(trainer.train_step(inputs, labels, epoch=0, step=0))
    torch.manual_seed(3)
    theirs = float(hand.train_step(inputs, labels, epoch=0, step=0))
    assert theirs == pytest.approx(ours, rel=1e-5)


def test_bench_step_aib_peer_ratio_is_written(bench, tmp_path, capsys):
    out = tmp_path / "aib.json"
    assert bench["step"].main(["--preset", "mlp", "--variants", "cal_aib", "pytorch_aib", "--latent-dim", "8",
                               "--rounds", "1", "--steps", "2", "--warmup", "1", "--threads", "1",
                               "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["latent_dim"] == 8 and result["cal_aib_to_pytorch_aib"] > 0
    assert "cal_aib / pytorch_aib" in capsys.readouterr().out


def test_barrier_releases_when_all_copies_arrived_and_names_itself_otherwise(bench, tmp_path):
    bench["step"].wait_for_peers(tmp_path / "b1", 1)
    (tmp_path / "b2").mkdir()
    (tmp_path / "b2" / "ready_999999").touch()  # another copy already waiting
    bench["step"].wait_for_peers(tmp_path / "b2", 2)
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"b3: only 1 of 3 copies arrived"):
        bench["step"].wait_for_peers(tmp_path / "b3", 3, timeout=0.2)
    assert time.time() - t0 < 5


@pytest.mark.parametrize("device,k", [("cpu", 2), ("cuda", 4)])
def test_packing_sweep_files_are_valid_sweeps_with_one_kth_of_the_device(bench, tmp_path, device, k):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny_run_dict(tmp_path)))
    args = Namespace(run_config=run, epochs=3, variant="plain", device=device, n_train=500, waves=2, cpus=8)
    plan = load_sweep(bench["sweep"].packing_sweep_file(tmp_path, k, args))
    spec = plan.spec
    assert spec.max_concurrent_trials == k and spec.search.num_samples == 2 * k
    if device == "cuda":
        assert spec.resources.gpus_per_worker == pytest.approx(1 / k) and spec.ray.num_gpus == 1
    else:
        assert spec.resources.cpus_per_worker == pytest.approx(8 / k) and spec.resources.gpus_per_worker == 0
    (cell,) = plan.cells
    assert cell.run["optim"]["epochs"] == 3 and cell.run["data"]["params"]["n_train"] == 500
    assert cell.run["method"]["strategy"] == "none" and cell.run["method"]["track_contributions"] is False


def test_bench_loader_compares_whole_and_per_sample_batches(bench, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny_run_dict(tmp_path)))
    out = tmp_path / "loader.json"
    assert bench["loader"].main(["--run-config", str(run), "--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["ms_per_batch"]) == {"per_sample", "whole_batch"} and len(result["rounds"]["per_sample"]) == 2
    assert "whole-batch loader" in capsys.readouterr().out


def test_bench_unimodal_grad_runs_both_settings(bench, capsys):
    bench["unimodal_grad"].main(["--layers", "1", "--tokens", "16", "--rounds", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert "with autograd" in out and "without autograd" in out and "ratio with / without" in out
