"""Cluster-scale sweeps (issue 17 items 2, 3): the shared-storage check and node loss, on a real
2-node Ray cluster started on this machine with `ray start` (calray.ray.local_cluster), plus the
manifest's retry record without Ray.

How "not visible on node B" is simulated on one machine: node B's `ray start` runs in its own
mount namespace (`unshare -m`) where `<root>/node_local` is covered by an empty tmpfs. On node B
the directory exists but is another filesystem — a node-local disk mounted at the same path —
while `<root>/shared` is the same directory on both nodes (one kernel, one disk), like NFS.
Nothing in calray knows about the simulation: the check's task really runs on node B and really
does not find the driver's files. Needs root (mount namespaces); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from calray.errors import ConfigError
from calray.ray.trial import FINAL_KEY
from calray.sweep.outputs import Manifest

from tests.conftest import tiny_run_dict

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- no Ray


def test_manifest_records_a_retry_and_counts_the_trial_once(tmp_path):
    from calray.sweep.progress import SweepCallback

    cb = SweepCallback(tmp_path / "manifest" / "c.jsonl", "c", 1, "val_acc", "max")
    cb.setup()
    run_dir = tmp_path / "t1"
    trial = SimpleNamespace(trial_id="t1", config={"run_dir": str(run_dir)}, last_result=None, error_file=None,
                            run_metadata=SimpleNamespace(num_failures=1))
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, {"epoch": 0, "val_acc": 0.5, FINAL_KEY: 0, "run_dir": str(run_dir)})
    err = tmp_path / "error.txt"
    (run_dir).mkdir()
    (run_dir / "error.txt").write_text("TrainingError: an older attempt's error\n")  # not this failure's
    err.write_text("Failure # 1 (occurred at 2026-12-01)\nValueError: first\n"
                   "Failure # 2 (occurred at 2026-12-01)\nThe actor died unexpectedly before finishing this task.\n"
                   "\tclass_name: ImplicitFunc\nThe actor died because its node has died. Node Id: ab12\n"
                   "\tthe actor's node was terminated unexpectedly\n")
    trial.error_file = str(err)
    cb.on_trial_recover(0, [], trial)
    cb.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        cb.on_trial_result(0, [], trial, {"epoch": epoch, "val_acc": 0.6, FINAL_KEY: 0})
    trial.last_result = {"epoch": 2, "val_acc": 0.6, FINAL_KEY: 1}
    cb.on_trial_result(0, [], trial, trial.last_result)
    cb.on_trial_complete(0, [], trial)
    events = cb.manifest.events()
    retry = [e for e in events if e["ev"] == "retry"]
    assert retry == [{"ev": "retry", "trial_id": "t1", "failures": 1, "t": retry[0]["t"],
                      "reason": "The actor died because its node has died. Node Id: ab12"}]
    (t,) = cb.manifest.trials().values()
    assert t["status"] == "TERMINATED" and sorted(t["epochs"]) == [0, 1, 2] and len(t["retries"]) == 1
    assert cb._finished == 1


def test_cluster_start_retries_on_new_ports_after_a_node_fails(tmp_path, monkeypatch):
    """LocalCluster.start: a node that exits during start-up (a taken port) restarts the cluster on
    new ports; the failed attempt's logs are kept aside; after `attempts` failures it raises."""
    from calray.ray import local_cluster
    from calray.ray.local_cluster import LocalCluster

    started, stopped = [], []

    def fake_start(self, name, args, hide):
        ports = local_cluster.free_ports(1)
        (self.root / f"{name}.log").write_text("log")
        (self.root / name).mkdir()
        node = local_cluster.Node(name, SimpleNamespace(pid=-1, poll=lambda: 0), self.root / f"{name}.log", ports[0])
        self.nodes.append(node)
        started.append((name, args, hide))
        return node

    failures = iter([RuntimeError("ray node node1 exited (1): port taken")])

    def fake_wait(self, n, timeout_s=180.0):
        err = next(failures, None)
        if err:
            raise err

    monkeypatch.setattr(LocalCluster, "_start", fake_start)
    monkeypatch.setattr(LocalCluster, "wait_for_nodes", fake_wait)
    monkeypatch.setattr(LocalCluster, "stop", lambda self, timeout_s=10.0: stopped.append(len(self.nodes)))
    cluster = LocalCluster(tmp_path / "ray")
    address = cluster.start([2, 3], hide={1: [tmp_path / "local"]})
    assert address == cluster.address and [n.name for n in cluster.nodes] == ["head", "node1"]
    assert [name for name, _, _ in started] == ["head", "node1", "head", "node1"] and stopped == [2]
    assert started[1][2] == [str(tmp_path / "local")] and "3" in started[3][1]
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == [
        "head", "head.attempt1", "head.log", "head.log.attempt1", "node1", "node1.attempt1", "node1.log",
        "node1.log.attempt1"]
    failures = iter([TimeoutError("2 Ray nodes not alive")] * 2)
    with pytest.raises(TimeoutError):
        LocalCluster(tmp_path / "ray2").start([1, 1], attempts=2)


def test_single_node_storage_check_is_a_no_op(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    from calray.ray import session

    monkeypatch.setattr(session, "_alive_nodes", lambda: [{"NodeID": "a" * 56, "Alive": True}])
    monkeypatch.setattr(ray, "remote", lambda *a, **k: pytest.fail("a task was started on one node"))
    session.check_shared_storage(tmp_path / "never_made")
    assert not (tmp_path / "never_made").exists()


def test_train_distributed_checks_storage_before_the_trainer(monkeypatch, tiny_cfg):
    pytest.importorskip("ray.train")
    from calray.ray import distributed

    calls = []

    def refuse(path, **kw):
        calls.append((Path(path), kw["key"]))
        raise ConfigError("distributed.storage_path: not shared")

    monkeypatch.setattr(distributed, "start_ray", lambda cfg: False)
    monkeypatch.setattr(distributed, "check_resources", lambda cfg: None)
    monkeypatch.setattr(distributed, "check_shared_storage", refuse)
    monkeypatch.setattr(distributed, "build_torch_trainer", lambda *a, **k: pytest.fail("trainer built"))
    cfg = tiny_cfg(distributed={"workers": 2})
    with pytest.raises(ConfigError, match="not shared"):
        distributed.train_distributed(cfg)
    assert calls == [(distributed.run_dir_for(cfg), "distributed.storage_path")]


# ---------------------------------------------------------------- a 2-node cluster on this machine


def _can_unshare() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


class Cluster:
    """Head (2 CPUs) + node B (2 CPUs, `node_local` hidden); node B restarted when a test killed it."""

    def __init__(self, root: Path):
        from calray.ray.local_cluster import LocalCluster

        self.root = root
        self.shared = root / "shared"
        self.node_local = root / "node_local"
        self.shared.mkdir(parents=True)
        self.node_local.mkdir(parents=True)
        self.lc = LocalCluster(root / "ray")
        self.address = self.lc.start([2, 2], hide={1: [self.node_local]})
        self.head, self.node_b = self.lc.nodes

    def ensure_node_b(self):
        if self.node_b.proc.poll() is not None:
            self.node_b = self.lc.add_node(num_cpus=2, hide=[self.node_local])
        t0 = time.time()
        while len(self.lc.alive_nodes()) < 2:
            assert time.time() - t0 < 120, "node B did not come back"
            time.sleep(1)

    def node_id(self, node) -> str:
        (n,) = [n for n in self.lc.alive_nodes() if n["NodeManagerPort"] == node.node_manager_port]
        return n["NodeID"]


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("optuna")
    if not _can_unshare():
        pytest.skip("needs mount namespaces (unshare -m, root on Linux) to hide a directory from one node")
    from calray.ray.session import init_ray

    if ray.is_initialized():  # another module's instance: this module drives its own cluster
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "PYTHONPATH")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved["PYTHONPATH"]) if p)
    root = Path(f"/tmp/crt_{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths live under it
    c = None
    try:
        c = Cluster(root)
        init_ray(c.address)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if c is not None:
            c.lc.stop()
        shutil.rmtree(root, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sweep_file(tmp_path: Path, name: str, storage: Path, **blocks) -> Path:
    tree = {"name": name, "run": tiny_run_dict(tmp_path), "search": {"num_samples": 1, "seed": 0, "space": {}},
            "resources": {"workers": 1, "cpus_per_worker": 1}, "ray": {"storage_path": str(storage)}}
    tree.update(blocks)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _sweep_cmd(path: Path, cluster: Cluster) -> list[str]:
    return [sys.executable, "-m", "calray.sweep", str(path), "--address", cluster.address]


def test_storage_check_names_the_node_that_cannot_see_the_sweep_dir(cluster, tmp_path):
    from calray.ray.session import STORAGE_PROBE_PREFIX, check_shared_storage

    cluster.ensure_node_b()
    shared = cluster.shared / "sweep_a"
    check_shared_storage(shared)  # the same directory on both nodes
    assert not list(shared.glob(STORAGE_PROBE_PREFIX + "*")), "the token file is left behind"

    local = cluster.node_local / "sweep_b"
    with pytest.raises(ConfigError) as info:
        check_shared_storage(local)
    msg = str(info.value)
    node_b = cluster.node_id(cluster.node_b)
    assert "\n" not in msg and msg.startswith("ray.storage_path: the sweep directory")
    assert str(local) in msg and "1 of 2 Ray nodes" in msg and f"node {node_b[:8]}" in msg, msg
    assert cluster.node_id(cluster.head)[:8] not in msg and "NFS" in msg

    # the CLI: one line, exit 2, before any trial
    path = _sweep_file(tmp_path, "blind", cluster.node_local / "sweeps")
    r = subprocess.run(_sweep_cmd(path, cluster), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "ray.storage_path (--storage-path)" in err and "not visible on 1 of 2" in err, err
    assert not (cluster.node_local / "sweeps" / "blind" / "manifest").exists()


def _results_after_retry(events: list[dict], trial_id: str) -> list[int]:
    mine = [e for e in events if e.get("trial_id") == trial_id]
    k = max(i for i, e in enumerate(mine) if e["ev"] == "retry")
    return [int(e["metrics"]["epoch"]) for e in mine[k:] if e["ev"] == "result" and e["metrics"].get(FINAL_KEY) == 0]


def test_node_loss_costs_only_its_trials_which_resume_on_the_head(cluster, tmp_path):
    import pandas as pd
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster.ensure_node_b()
    epochs = 5
    run = tiny_run_dict(tmp_path, optim={"name": "sgd", "lr": 0.05, "epochs": epochs})
    # epochs of a few seconds even on an idle machine: a trial must not finish between the raylet's
    # death and its detection (at 3000 samples both trials ended 3.8 s after the kill, unretried)
    run["data"]["params"]["n_train"] = 15000
    path = _sweep_file(tmp_path, "nodeloss", cluster.shared / "sweeps", run=run, max_concurrent_trials=2,
                       max_failures=1, search={"num_samples": 2, "seed": 0, "space": {}})
    sdir = cluster.shared / "sweeps" / "nodeloss"
    manifest = Manifest(sdir / "manifest" / "synthetic__none.jsonl")

    # the head's 2 CPUs held by a placeholder: both trials start on node B
    hold = ray.remote(num_cpus=2)(_Hold).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.node_id(cluster.head), soft=False)).remote()
    ray.get(hold.ready.remote(), timeout=120)
    proc = subprocess.Popen(_sweep_cmd(path, cluster), cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not any(e["ev"] == "result" for e in manifest.events()):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - t0 < 300, "no trial reported an epoch"
            time.sleep(0.2)
        assert not manifest.finished()
        running = set(manifest.trials())
        reported = {tid: max(t["epochs"]) for tid, t in manifest.trials().items() if t["epochs"]}
        print(f"kill after {time.time() - t0:.1f}s: reported {reported}", file=sys.stderr)
        cluster.lc.kill_raylet(cluster.node_b)  # node B is lost with its trials
        ray.kill(hold)  # the head can take them
        out, _ = proc.communicate(timeout=400)
        print(f"sweep done after {time.time() - t0:.1f}s", file=sys.stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
        ray.kill(hold)
    assert proc.returncode == 0, out[-4000:]
    assert cluster.node_id(cluster.head) and len(cluster.lc.alive_nodes()) == 1  # node B stayed dead

    events = manifest.events()
    retried = {e["trial_id"] for e in events if e["ev"] == "retry"}
    print("retries:", [e["reason"] for e in events if e["ev"] == "retry"], file=sys.stderr)
    assert retried and retried <= running, events
    assert all(e["reason"] and e["reason"] != "unknown error" for e in events if e["ev"] == "retry")
    trials = manifest.trials()
    assert len(trials) == 2 and {t["status"] for t in trials.values()} == {"TERMINATED"}
    assert set(reported) & retried, (reported, retried)
    for tid in retried:
        run_dir = Path(trials[tid]["run_dir"])
        resumed = _results_after_retry(events, tid)
        if tid in reported:  # it had a checkpoint: it goes on from there, not from epoch 0
            assert resumed and resumed[0] > reported[tid] and resumed == list(range(resumed[0], epochs)), resumed
            assert "resumed from" in (run_dir / "train.log").read_text()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert [r["epoch"] for r in rows] == list(range(epochs))
    df = pd.read_parquet(sdir / "trials.parquet")
    assert df.trial_id.nunique() == 2 and not df.duplicated(["trial_id", "epoch"]).any()
    rec = json.loads((sdir / "cells.json").read_text())[0]
    assert rec["status"] == "done" and rec["n_trials"] == 2 and rec["n_failed"] == 0


class _Hold:
    def ready(self) -> bool:
        return True
