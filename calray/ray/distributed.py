"""Ray Train (V2) runs of the one training loop: N DDP workers, contributions all-reduced before the softmax.

Nothing here copies the loop. Every worker builds a `RunContext` (rank, world size, device, DDP
wrapping, a reporter that calls `ray.train.report` on every rank) and runs the same
`calray.engine.trainer.Trainer(...).fit()` as a single-process run. The loop already

- shards data with `ShardedSampler` (rank r takes positions r, r+W, … of one seeded order, so
  W workers × batch B/W see exactly the batches of 1 process × batch B; evaluation covers every
  sample exactly once),
- SUM-all-reduces `ContributionStats` before computing W, a = softmax(T·W) and β, so every rank
  holds bit-identical a (checked by `assert_ranks_agree` when `distributed.check_consistency`),
- modulates gradients after backward, i.e. after DDP has averaged them,
- sums evaluation counts/losses over ranks, and writes checkpoints on rank 0 only.

Entry points:

- `train_distributed(cfg)`: the CLI's `--workers N [--gpu] [--address ADDR]` path. Starts (or
  connects to) Ray, checks resources, runs a `TorchTrainer` and returns the rank-0 summary.
- `build_torch_trainer(cfg, ...)`: the `TorchTrainer` alone, for callers that already run inside
  Ray (the sweep layer builds one per >1-worker trial).
- `train_loop_per_worker(config)`: the per-worker function (what `build_torch_trainer` runs).
- `assert_ranks_agree(values, device)`: the debug consistency check the trainer calls.

Layout on storage (see docs/DISTRIBUTED.md): the trainer's run directory is
``<storage>/<run name>`` with ``<storage>`` = `distributed.storage_path` or `runtime.output_dir`
(absolute), and Ray Train's own experiment directory (reported checkpoints, snapshot used for
restore) is ``<run dir>/ray_train``. Every worker must see the run directory: on a multi-node
cluster put it on a shared filesystem (NFS, Lustre, …).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from calray.config import absolute_paths, config_from_dict
from calray.data.base import build_datasets
from calray.dist import RankMismatchError, assert_ranks_agree  # noqa: F401 (re-exported)
from calray.engine.evaluate import to_device
from calray.engine.resume import check_resumable
from calray.engine.trainer import RunContext, Trainer
from calray.errors import ConfigError, TrainingError
from calray.io import LAST_CHECKPOINT, append_jsonl, read_jsonl, write_jsonl
from calray.models.multimodal import ModelOutput, batched_sample
from calray.ray.session import check_shared_storage, init_ray

RAY_SUBDIR = "ray_train"  # Ray Train's experiment directory name, inside the run directory
SHARED_MARKER = ".calray_shared_storage"  # written by the driver, read by every worker
RANK_LOG_DIR = "ranks"  # per-rank copies of the reported rows (check_consistency only)
INJECT_ENV = "CALRAY_INJECT_FAILURE"  # fault injection: "EPOCH[:RANK[:kill|raise]]", once per run dir
SKIP_RESOURCE_CHECK_ENV = "CALRAY_SKIP_RESOURCE_CHECK"  # autoscaling clusters: don't pre-check resources


# ---------------------------------------------------------------------------- layout and config


def _absolute(path: str | None) -> str | None:
    if path is None:
        return None
    return str(Path(path).expanduser().resolve())


def storage_root(cfg) -> Path:
    """Where the run directory lives: `distributed.storage_path`, else `runtime.output_dir` (absolute)."""
    sp = cfg.distributed.storage_path
    if sp is not None and "://" in sp:
        raise ConfigError(
            f"distributed.storage_path: {sp!r}: URIs are not supported; the trainer writes its run directory "
            "there, so it must be a filesystem path every worker can see (e.g. an NFS mount)")
    return Path(_absolute(sp or cfg.runtime.output_dir))


def run_dir_for(cfg) -> Path:
    """The trainer's run directory for a distributed run: ``<storage root>/<run name>``."""
    return storage_root(cfg) / (cfg.runtime.run_name or cfg.name)


def prepare_worker_config(cfg, run_dir: Path):
    """The config the workers run: relative paths made absolute (workers' cwd is not the driver's;
    `calray.config.absolute_paths`), outputs under the storage root, no progress bars (they garble
    Ray's log streaming)."""
    tree = absolute_paths(cfg.to_dict())
    tree["runtime"]["output_dir"] = str(run_dir.parent)
    tree["runtime"]["run_name"] = run_dir.name
    tree["runtime"]["progress"] = False
    return config_from_dict(tree, "distributed worker config")


def validate(cfg) -> None:
    """Configuration errors that would otherwise surface on the workers (or as a hang)."""
    d = cfg.distributed
    if d.sync_bn and not d.gpu:
        raise ConfigError("distributed.sync_bn: torch's SyncBatchNorm only runs on CUDA tensors; use it with "
                          "--gpu (distributed.gpu: true) or turn it off for CPU workers")
    dev = cfg.runtime.device
    if d.gpu and not (dev == "auto" or dev.startswith("cuda")):
        raise ConfigError(f"runtime.device: {dev!r} contradicts distributed.gpu: true")
    if not d.gpu and dev.startswith("cuda"):
        raise ConfigError(f"runtime.device: {dev!r}: Ray gives workers GPUs only with --gpu (distributed.gpu: true)")
    storage_root(cfg)


def parse_injection(spec: str | None, world_size: int) -> dict | None:
    """`CALRAY_INJECT_FAILURE=EPOCH[:RANK[:kill|raise]]` → {"epoch", "rank", "mode"}; rank defaults to the
    last rank, mode to "kill" (SIGKILL of the worker process right after its report of EPOCH)."""
    if not spec:
        return None
    parts = spec.split(":")
    try:
        epoch = int(parts[0])
        rank = int(parts[1]) if len(parts) > 1 and parts[1] != "" else world_size - 1
    except ValueError:
        raise ConfigError(f"{INJECT_ENV}={spec!r}: expected EPOCH[:RANK[:kill|raise]]") from None
    mode = parts[2] if len(parts) > 2 else "kill"
    if mode not in ("kill", "raise") or not 0 <= rank < world_size or len(parts) > 3:
        raise ConfigError(f"{INJECT_ENV}={spec!r}: expected EPOCH[:RANK[:kill|raise]] with 0 <= RANK < {world_size}")
    return {"epoch": epoch, "rank": rank, "mode": mode}


# ---------------------------------------------------------------------------- the worker side


def unused_parameters(model: torch.nn.Module, inputs) -> list[str]:
    """Names of trainable parameters that get no gradient from one forward/backward on `inputs`.

    Run in eval mode (no buffer updates, no dropout or AIB sampling) inside `fork_rng`, and the
    gradients are cleared afterwards, so training is unaffected.
    """
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            with torch.enable_grad():
                out = model(inputs)
                tensors = []
                if isinstance(out, ModelOutput):
                    tensors = [out.fused_logits, *out.unimodal_logits.values(), *out.mu.values(),
                               *out.logvar.values()]
                elif isinstance(out, torch.Tensor):
                    tensors = [out]
                total = sum(t.float().sum() for t in tensors if t.requires_grad)
                if isinstance(total, torch.Tensor):
                    total.backward()
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def make_wrap_model(rank_device: torch.device, world_size: int, sync_bn: bool,
                    find_unused_parameters: bool | None, probe_inputs=None) -> Callable:
    """DDP wrapping for `RunContext.wrap_model` (identity at world size 1).

    SyncBatchNorm conversion happens before wrapping (it replaces BatchNorm children in place, so
    the trainer's `raw_model` and the optimiser see the converted modules). `broadcast_buffers`
    stays on: rank 0's buffers (BatchNorm running stats) are used everywhere, as in its checkpoint.
    `find_unused_parameters=None` probes the model once with `probe_inputs` and turns the option on
    only when some parameter gets no gradient (it costs an autograd-graph traversal every step).
    """

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        if world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn:
            converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if converted is not model:
                raise TrainingError("distributed.sync_bn: the top-level model itself is a BatchNorm layer")
        find_unused = find_unused_parameters
        if find_unused is None:
            find_unused = bool(probe_inputs is not None and unused_parameters(model, probe_inputs()))
        cuda = rank_device.type == "cuda"
        return DistributedDataParallel(model, device_ids=[rank_device.index] if cuda else None,
                                       output_device=rank_device.index if cuda else None,
                                       find_unused_parameters=find_unused)

    return wrap


def _check_shared(run_dir: Path, token: str, rank: int) -> None:
    marker = run_dir / SHARED_MARKER
    try:
        seen = marker.read_text().strip()
    except OSError:
        seen = None
    if seen != token:
        import socket

        raise ConfigError(
            f"rank {rank} on host {socket.gethostname()} cannot see the run directory {run_dir} written by the "
            f"driver ({marker} {'missing' if seen is None else 'from another run'}); on a multi-node cluster set "
            "distributed.storage_path to a filesystem shared by every node")


def _local_checkpoint(checkpoint) -> Path | None:
    """Ray's latest reported checkpoint as a local `last.pt` (copied into a fresh temp dir)."""
    if checkpoint is None:
        return None
    local = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="calray_resume_")))
    path = local / LAST_CHECKPOINT
    if not path.is_file():
        raise TrainingError(f"Ray checkpoint {checkpoint.path} has no {LAST_CHECKPOINT} "
                            f"(files: {sorted(os.listdir(local))})")
    return path


class _RankLog:
    """`ranks/rank{r}.jsonl`: this rank's reported rows, truncated like metrics.jsonl on resume."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / RANK_LOG_DIR / f"rank{rank}.jsonl"
        self.first = True

    def write(self, row: dict) -> None:
        if self.first and self.path.exists():
            write_jsonl(self.path, [r for r in read_jsonl(self.path) if r.get("epoch", -1) < row["epoch"]])
        self.first = False
        append_jsonl(self.path, row)


def _maybe_inject_failure(injection: dict | None, epoch: int, rank: int, run_dir: Path) -> None:
    if injection is None or injection["epoch"] != epoch or injection["rank"] != rank:
        return
    marker = run_dir / f".calray_injected_failure_epoch{epoch}_rank{rank}"
    if marker.exists():  # once per run directory: the restarted worker group goes on
        return
    marker.write_text("injected\n")
    print(f"[calray] {INJECT_ENV}: injected failure ({injection['mode']}) on rank {rank} after epoch {epoch}",
          flush=True)
    if injection["mode"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise TrainingError(f"{INJECT_ENV}: injected failure on rank {rank} after epoch {epoch}")


def _quiet_report_log() -> None:
    """Ray 2.60 logs every `ray.train.report` call on every rank with its full metrics dict at INFO,
    through a logger named after the file (`logging.getLogger(__file__)`), so `LoggingConfig`
    cannot filter it. Raise that one logger to WARNING; Ray's other messages stay."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_context

        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logging as is
        pass


def _check_eval_splits(splits, world: int) -> None:
    for name in ("val", "test"):
        n = len(getattr(splits, name))
        if n < world:
            raise ConfigError(f"the {name} split has {n} samples, fewer than the {world} workers: every rank "
                              "needs at least one evaluation sample (DDP's first eval forward is a collective)")


def _make_reporter(run_dir: Path, rank: int, rank_log: _RankLog | None, injection: dict | None) -> Callable:
    """`RunContext.reporter` on a Ray Train worker: `ray.train.report` on every rank, every epoch (it is
    a barrier), with rank 0's checkpoint attached; then the fault injection, if any."""
    import ray.train

    def reporter(row: dict, checkpoint_path) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None}
        if rank_log is not None:
            rank_log.write(row)
        if checkpoint_path is not None:
            with tempfile.TemporaryDirectory(prefix="calray_ckpt_") as tmp:
                shutil.copy2(checkpoint_path, Path(tmp) / LAST_CHECKPOINT)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_epoch{row['epoch']:05d}")
        else:
            ray.train.report(metrics)
        _maybe_inject_failure(injection, row["epoch"], rank, run_dir)

    return reporter


def train_loop_per_worker(config: dict) -> dict:
    """What every Ray Train worker runs: the one `Trainer` with a Ray `RunContext`.

    `config` (the TorchTrainer's `train_loop_config`): "cfg" (the run config as a dict), "run_dir",
    "token" (the shared-storage marker written by the driver), optional "inject_failure".
    Returns the rank-0 summary (Ray's `Result.return_value`).
    """
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    cfg = config_from_dict(config["cfg"], "distributed worker config")
    run_dir = Path(config["run_dir"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.distributed.gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _check_shared(run_dir, config["token"], rank)
    splits = build_datasets(cfg)
    _check_eval_splits(splits, world)

    resume_from = _local_checkpoint(ray.train.get_checkpoint())
    rank_log = _RankLog(run_dir, rank) if cfg.distributed.check_consistency else None
    d = cfg.distributed

    def probe_inputs():
        return to_device(batched_sample(splits.train)[0], device)

    ctx = RunContext(rank=rank, world_size=world, device=device,
                     wrap_model=make_wrap_model(device, world, d.sync_bn, d.find_unused_parameters, probe_inputs),
                     reporter=_make_reporter(run_dir, rank, rank_log, config.get("inject_failure")),
                     resume_from=resume_from, run_dir=run_dir)
    try:
        summary = Trainer(cfg, ctx, splits).fit()
    finally:
        if resume_from is not None:
            shutil.rmtree(resume_from.parent, ignore_errors=True)
    summary = dict(summary)
    summary["distributed"] = {"workers": world, "backend": "nccl" if device.type == "cuda" else "gloo",
                              "ray_dir": str(run_dir / RAY_SUBDIR)}
    return summary


# ---------------------------------------------------------------------------- the driver side


def build_torch_trainer(cfg, *, run_dir: str | Path | None = None, name: str | None = None,
                        storage_path: str | Path | None = None,
                        run_config_callbacks: Sequence[Any] | None = None,
                        inject_failure: str | None = None):
    """A `ray.train.torch.TorchTrainer` running `train_loop_per_worker` for `cfg`; no `ray.init`, no fit.

    Args:
        cfg: the `calray.config.RunConfig`; `cfg.distributed` gives workers, gpu, cpus_per_worker,
            max_failures, find_unused_parameters, collective_timeout_s.
        run_dir: the trainer's run directory (config.yaml, metrics.jsonl, checkpoints/, summary.json).
            Default `run_dir_for(cfg)` = ``<storage_path or output_dir>/<run name>``. Must be a
            filesystem path every worker can see.
        name: Ray Train run name (no timestamps: rerunning the same name restores from its latest
            checkpoint). Default ``"ray_train"``.
        storage_path: Ray Train's storage path; Ray's experiment dir is ``storage_path/name``.
            Default: `run_dir`, so Ray's files live in ``<run dir>/ray_train``.
        run_config_callbacks: `ray.train.UserCallback`s for `RunConfig(callbacks=...)`, e.g.
            `[ray.tune.integration.ray_train.TuneReportCallback()]` when called inside a Tune trial.
        inject_failure: fault injection for tests/drills, ``"EPOCH[:RANK[:kill|raise]]"``
            (default: the `CALRAY_INJECT_FAILURE` environment variable of the calling process).

    Returns the TorchTrainer; `trainer.fit().return_value` is the rank-0 summary dict
    (`Result.metrics` holds the metrics of the latest epoch that wrote a checkpoint).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    validate(cfg)
    d = cfg.distributed
    run_dir = Path(_absolute(str(run_dir))) if run_dir is not None else run_dir_for(cfg)
    worker_cfg = prepare_worker_config(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    (run_dir / SHARED_MARKER).write_text(token + "\n")
    spec = inject_failure if inject_failure is not None else os.environ.get(INJECT_ENV)
    resources = {"CPU": d.cpus_per_worker}
    if d.gpu:
        resources["GPU"] = 1  # whole GPUs: NCCL rejects two ranks on one device (ray#48012)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": worker_cfg.to_dict(), "run_dir": str(run_dir), "token": token,
                           "inject_failure": parse_injection(spec, d.workers)},
        torch_config=TorchConfig(backend="nccl" if d.gpu else "gloo", timeout_s=int(d.collective_timeout_s)),
        scaling_config=ray.train.ScalingConfig(num_workers=d.workers, use_gpu=d.gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name or RAY_SUBDIR,
            storage_path=str(storage_path if storage_path is not None else run_dir),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(run_config_callbacks or []),
            # Ray Train's print patch would echo every line rank 0 prints twice
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


def local_num_cpus(d) -> int:
    """Logical CPUs for a local Ray instance: enough for every worker plus one spare, at least 4.

    Logical CPUs are a scheduling budget, not cores: on a 2-core machine the default (2) cannot
    place 2 workers × 1 CPU plus Ray's own actors and the worker group hangs until its start timeout.
    """
    return max(4, math.ceil(d.workers * d.cpus_per_worker) + 1)


def start_ray(cfg) -> bool:
    """Connect to or start Ray for `cfg.distributed` (calray.ray.session.init_ray); True when this
    call started it. A local instance gets `local_num_cpus` logical CPUs."""
    d = cfg.distributed
    local = d.address in (None, "local")
    return init_ray(d.address, key="distributed.address", num_cpus=local_num_cpus(d) if local else None,
                    log_to_driver=True, logging_level=logging.INFO)


def check_resources(cfg) -> None:
    """Fail fast when the cluster cannot place every worker (Ray Train would otherwise retry forever)."""
    import ray

    if os.environ.get(SKIP_RESOURCE_CHECK_ENV):
        return
    d = cfg.distributed
    total = ray.cluster_resources()
    need_cpu = d.workers * d.cpus_per_worker
    if total.get("CPU", 0.0) + 1e-9 < need_cpu:
        raise ConfigError(
            f"distributed: {d.workers} workers × {d.cpus_per_worker} CPU need {need_cpu:g} logical CPUs but the Ray "
            f"cluster has {total.get('CPU', 0.0):g}; lower distributed.cpus_per_worker (fractions like 0.5 work) or "
            f"add nodes (set {SKIP_RESOURCE_CHECK_ENV}=1 on an autoscaling cluster)")
    if d.gpu and total.get("GPU", 0.0) + 1e-9 < d.workers:
        raise ConfigError(
            f"distributed: {d.workers} GPU workers need {d.workers} whole GPUs but the Ray cluster has "
            f"{total.get('GPU', 0.0):g} (set {SKIP_RESOURCE_CHECK_ENV}=1 on an autoscaling cluster)")


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if nxt is None or not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


def _failure_message(err: BaseException) -> str:
    failures = getattr(err, "worker_failures", None)
    if failures:
        parts = []
        for rank, exc in sorted(failures.items()):
            cause = _root_cause(exc)
            msg = str(cause).strip().splitlines()
            parts.append(f"rank {rank}: {type(cause).__name__}: {msg[-1] if msg else ''}")
        return "; ".join(parts)
    cause = _root_cause(err)
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def train_distributed(cfg, *, inject_failure: str | None = None) -> dict:
    """Run `cfg` on `cfg.distributed.workers` Ray Train workers and return the rank-0 summary.

    Starts a local Ray instance (or connects to `distributed.address`) unless Ray is already
    initialised, and shuts down only what it started. With `runtime.resume: false` a previous Ray
    run in the same directory is removed first (Ray would otherwise restore its latest checkpoint).
    """
    validate(cfg)
    try:
        import ray
        from ray.train import TrainingFailedError
    except ImportError as e:
        raise ConfigError(f"distributed.workers={cfg.distributed.workers} / --address need Ray ({e}); install it with "
                          "pip install 'ray[default,tune,train]'") from None

    run_dir = run_dir_for(cfg)
    if cfg.runtime.resume:  # the workers check too; here it fails before Ray starts
        check_resumable(run_dir, prepare_worker_config(cfg, run_dir).to_dict())
    if not cfg.runtime.resume and (run_dir / RAY_SUBDIR).exists():
        shutil.rmtree(run_dir / RAY_SUBDIR)
    started = start_ray(cfg)
    try:
        check_resources(cfg)
        check_shared_storage(run_dir, key="distributed.storage_path", what="the run directory")
        trainer = build_torch_trainer(cfg, run_dir=run_dir, inject_failure=inject_failure)
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise TrainingError(f"Ray Train run {run_dir} failed: {_failure_message(e)}") from e
    finally:
        if started:
            ray.shutdown()
    summary = result.return_value
    if not isinstance(summary, dict):
        raise TrainingError(f"Ray Train run {run_dir} finished without a summary from rank 0 (got {summary!r})")
    return summary


__all__ = ["RankMismatchError", "assert_ranks_agree", "build_torch_trainer", "check_resources", "start_ray",
           "local_num_cpus", "run_dir_for", "storage_root", "train_distributed", "train_loop_per_worker"]
