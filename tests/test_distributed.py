"""Ray Train runs of the one loop (calray.ray.distributed): CPU, gloo, 2 workers.

Each TorchTrainer start costs ~25 s on a 2-core machine, so the Ray tests share one local Ray
instance and one 2-worker CLI run (`dist_run`), checked from three angles (it ran from the CLI;
ranks agree exactly on W/a/β; it matches 1 process × the global batch), plus one
fail / restore / kill-and-resume sequence. The consistency check and the unused-parameter probe are tested without Ray.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

from calray.engine.checkpoint import load_checkpoint
from calray.config import config_from_dict
from tests.conftest import tiny_run_dict

B = 32  # global batch; each of the 2 workers takes B/2
CONTRIB_KEYS = ("W_", "a_", "beta_")


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dist_tree(tmp_path: Path, out: str, *, batch: int, epochs: int, **extra) -> dict:
    """Tiny synthetic run without BatchNorm and without stochastic layers (aib off, no dropout), so
    2 workers × batch B/2 and 1 process × batch B compute the same thing up to float rounding."""
    runtime = {"output_dir": str(tmp_path / out), "progress": False, "seed": 0, "max_steps_per_epoch": 4}
    runtime.update(extra.pop("runtime", {}))
    tree = tiny_run_dict(
        tmp_path,
        data={**tiny_run_dict(tmp_path)["data"], "batch_size": batch},
        method={"strategy": "cal", "T": 1.0, "eta": 1.0, "lambda": 0.1, "n": 2, "aib": "off", "update_every": 2},
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": epochs},
        runtime=runtime,
        distributed={"check_consistency": True, "collective_timeout_s": 120, **extra.pop("distributed", {})},
    )
    tree.update(extra)
    return tree


def params_of(run_dir: Path) -> dict[str, torch.Tensor]:
    # emb_mean_* buffers are EMAs of per-process batch means (DDP broadcasts rank 0's), not parameters
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    return {k: v for k, v in state.items() if not k.startswith("emb_mean")}


def assert_params_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=atol), \
            f"{k}: max |diff| {float((a[k].double() - b[k].double()).abs().max()):.3g}"


# ------------------------------------------------------------------ no Ray needed


def _agree_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from calray.dist import RankMismatchError, assert_ranks_agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for disagree in (False, True):
        a = {"audio": 0.75, "visual": 0.25 + (1e-12 if disagree and rank == 1 else 0.0)}
        try:
            assert_ranks_agree({"W": {"audio": 1.0, "visual": 0.1}, "a": a, "beta": {"audio": 0.25, "visual": 0.75}})
            results.append("ok")
        except RankMismatchError as e:
            results.append(str(e))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_assert_ranks_agree_all_gathers_and_names_the_rank(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children reuse this process's imports (spawn costs ~15 s per process on 2 busy cores)
    mp.start_processes(_agree_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    agree, disagree = zip(*(json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)))
    assert agree == ("ok", "ok")
    for text in disagree:  # both ranks raise: nobody is left waiting in a collective
        assert "rank 1 differs from rank 0" in text and "a_visual" in text, text
        assert "0.25" in text and "W_audio" not in text


def test_assert_ranks_agree_is_a_no_op_without_a_process_group():
    from calray.dist import assert_ranks_agree

    assert_ranks_agree({"a": {"x": 1.0}})


def test_unused_parameter_probe_leaves_no_trace(tiny_cfg):
    from calray.data.base import build_datasets
    from calray.ray.distributed import unused_parameters
    from calray.models import build_model
    from calray.models.multimodal import batched_sample

    cfg = tiny_cfg()
    splits = build_datasets(cfg)
    model = build_model(cfg, splits)
    inputs = batched_sample(splits.train)[0]
    assert unused_parameters(model, inputs) == []
    model.encoders["audio"].idle = torch.nn.Linear(2, 2)  # like BERT's pooler: never in the forward pass
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert unused_parameters(model, inputs) == ["encoders.audio.idle.weight", "encoders.audio.idle.bias"]
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_worker_config_has_absolute_paths_incl_the_datasets_path_params(tmp_path, monkeypatch):
    """A --workers run's workers start elsewhere: every relative path of the config, mvsa_single's
    data.params.tokenizer included, reaches them absolute (no Ray needed)."""
    from calray.config import load_config
    from calray.ray.distributed import prepare_worker_config, run_dir_for

    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "mvsa.yaml", ["distributed.workers=2"])
    assert cfg.data.params["tokenizer"] == "weights/bert-base-uncased"
    run_dir = run_dir_for(cfg)
    worker = prepare_worker_config(cfg, run_dir)
    assert worker.data.params["tokenizer"] == str(tmp_path / "weights" / "bert-base-uncased")
    assert worker.data.params["val_file"] == "dev.jsonl"  # a file name relative to data.root: unchanged
    assert worker.data.root == str(tmp_path / "data" / "MVSA_Single")
    assert worker.model.encoders["image"].weights == str(tmp_path / "weights" / "resnet152-394f9c45.pth")
    assert worker.model.encoders["text"].pretrained_path == str(tmp_path / "weights" / "bert-base-uncased")
    assert (worker.runtime.output_dir, worker.runtime.run_name) == (str(run_dir.parent), run_dir.name)
    assert worker.runtime.progress is False


def test_config_errors_are_raised_before_ray_starts(tiny_cfg):
    from calray.ray.distributed import parse_injection, validate
    from calray.errors import ConfigError

    with pytest.raises(ConfigError, match="sync_bn.*CUDA"):
        validate(tiny_cfg(distributed={"workers": 2, "sync_bn": True}))
    with pytest.raises(ConfigError, match="storage_path.*URIs"):
        validate(tiny_cfg(distributed={"workers": 2, "storage_path": "s3://bucket/x"}))
    assert parse_injection("2", 2) == {"epoch": 2, "rank": 1, "mode": "kill"}
    assert parse_injection("1:0:raise", 2) == {"epoch": 1, "rank": 0, "mode": "raise"}
    with pytest.raises(ConfigError, match="EPOCH"):
        parse_injection("1:2", 2)


# ------------------------------------------------------------------ Ray



@pytest.fixture(scope="module")
def dist_run(ray_local, tmp_path_factory):
    """One `python -m calray.train CFG --workers 2` run (in-process main), 2 epochs × 4 steps of B/2."""
    from calray.train import main

    tmp = tmp_path_factory.mktemp("dist")
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(dist_tree(tmp, "runs", batch=B // 2, epochs=2)))
    rc = main([str(path), "--workers", "2"])
    return {"rc": rc, "tmp": tmp, "run_dir": tmp / "runs" / "tiny"}


def test_cli_runs_two_workers(dist_run):
    assert dist_run["rc"] == 0
    run_dir = dist_run["run_dir"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["distributed"]["workers"] == 2 and saved["data"]["batch_size"] == B // 2
    assert [r["epoch"] for r in rows_of(run_dir / "metrics.jsonl")] == [0, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["test"]["n"] == 96  # every test sample once, summed over ranks
    assert all(r["val_n"] == 64 for r in rows_of(run_dir / "metrics.jsonl"))
    # Ray's side: Result.metrics come from the latest reported checkpoint (rank 0's, epoch 1)
    from ray.train import Result

    result = Result.from_path(str(run_dir / "ray_train"))
    assert result.metrics["epoch"] == 1
    assert sorted(os.listdir(result.checkpoint.path)) == ["last.pt"]


def test_ranks_agree_exactly_on_contributions(dist_run):
    run_dir = dist_run["run_dir"]
    r0, r1 = (rows_of(run_dir / "ranks" / f"rank{r}.jsonl") for r in (0, 1))
    assert [r["epoch"] for r in r0] == [r["epoch"] for r in r1] == [0, 1]
    for a, b in zip(r0, r1):
        keys = [k for k in a if k.startswith(CONTRIB_KEYS)]
        assert len(keys) == 6
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}  # bit-identical, not approximately
        timing = ("time_s", "train_time_s")  # wall clock differs per rank
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert r0[-1]["a_audio"] != pytest.approx(0.5)  # a moved off uniform, so the comparison means something
    # metrics.jsonl (rank 0) carries the same, already all-reduced values
    assert rows_of(run_dir / "metrics.jsonl")[-1]["a_audio"] == r0[-1]["a_audio"]


def test_two_workers_match_one_process_with_twice_the_batch(dist_run):
    from calray.engine.trainer import train

    tmp = dist_run["tmp"]
    ref = config_from_dict(dist_tree(tmp, "single", batch=B, epochs=2), "single")
    assert ref.distributed.workers == 1
    train(ref)
    dist_rows = rows_of(dist_run["run_dir"] / "metrics.jsonl")
    ref_rows = rows_of(ref.run_dir() / "metrics.jsonl")
    for d, s in zip(dist_rows, ref_rows, strict=True):
        for key in s:
            if key != "train_time_s" and key.startswith(CONTRIB_KEYS + ("I_", "phi_", "P_", "R_", "D_", "train_", "val_")):
                assert d[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), key
    assert dist_rows[-1]["a_audio"] != pytest.approx(0.5)
    assert_params_close(params_of(dist_run["run_dir"]), params_of(ref.run_dir()))


def test_resource_check_fails_fast(ray_local, tiny_cfg):
    from calray.ray.distributed import check_resources
    from calray.errors import ConfigError

    check_resources(tiny_cfg(distributed={"workers": 2}))
    with pytest.raises(ConfigError, match="need 8 logical CPUs but the Ray cluster has 4"):
        check_resources(tiny_cfg(distributed={"workers": 4, "cpus_per_worker": 2}))
    with pytest.raises(ConfigError, match="2 whole GPUs"):
        check_resources(tiny_cfg(distributed={"workers": 2, "gpu": True}))


def test_failure_then_restore_then_kill_and_resume(ray_local, tmp_path):
    """Checkpoints exist only after epochs 1 and 3 (checkpoint_every 2).

    1. max_failures 0, rank 1 raises after epoch 1: the run fails with an error naming the rank.
    2. The same command again: Ray Train restores its run snapshot, every worker resumes from the
       epoch-1 checkpoint; rank 1 is SIGKILLed after reporting epoch 2 and, with max_failures 1,
       the restarted worker group resumes from epoch 1 again and re-runs epoch 2 (whose first row
       must be dropped).
    The history has no gaps or repeats, and the result equals 1 process × batch B run straight through.
    """
    from calray.ray.distributed import train_distributed
    from calray.errors import TrainingError
    from calray.engine.trainer import train

    def cfg_with(max_failures):
        extra = {"runtime": {"checkpoint_every": 2}, "distributed": {"workers": 2, "max_failures": max_failures}}
        return config_from_dict(dist_tree(tmp_path, "runs", batch=B // 2, epochs=4, **extra), "resume")

    with pytest.raises(TrainingError, match=r"rank 1: TrainingError: .*injected failure on rank 1 after epoch 1"):
        train_distributed(cfg_with(0), inject_failure="1:1:raise")
    run_dir = cfg_with(0).run_dir()
    assert [r["epoch"] for r in rows_of(run_dir / "metrics.jsonl")] == [0, 1]

    summary = train_distributed(cfg_with(1), inject_failure="2:1:kill")
    assert (run_dir / ".calray_injected_failure_epoch2_rank1").exists()  # the kill did happen
    assert summary["epochs_run"] == 4 and summary["distributed"]["workers"] == 2
    assert [r["epoch"] for r in rows_of(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    for r in (0, 1):
        assert [row["epoch"] for row in rows_of(run_dir / "ranks" / f"rank{r}.jsonl")] == [0, 1, 2, 3]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 3

    ref = config_from_dict(dist_tree(tmp_path, "single", batch=B, epochs=4), "ref")
    train(ref)
    ref_rows = rows_of(ref.run_dir() / "metrics.jsonl")
    for d, s in zip(rows_of(run_dir / "metrics.jsonl"), ref_rows, strict=True):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)
        assert d["a_audio"] == pytest.approx(s["a_audio"], rel=1e-5)
    assert_params_close(params_of(run_dir), params_of(ref.run_dir()))
