"""The one Ray initialisation every layer uses (CLI runs with --workers, sweeps, robustness retrains).

- address None or "local": a new local instance (`address="local"`, so a `ray start` cluster on
  this machine is never joined by accident); its workers inherit this process's environment.
- "auto" or host:port: a running cluster. Its workers do not inherit this shell's environment, so
  PYTHONPATH (calray's source root first, for a checkout that is not installed) and
  RAY_CHDIR_TO_TRIAL_DIR=0 (trials keep the driver's working directory) go in the runtime_env.

`check_shared_storage(path)`: on a cluster of several nodes, a task pinned to every alive node
checks that the sweep (or run) directory and a token file the driver wrote there are visible on
that node, so a node-local `storage_path` fails before the first trial instead of late inside
Ray Train (docs/DISTRIBUTED.md "Shared storage").
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from calray.errors import ConfigError

log = logging.getLogger("calray.ray")
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the calray package


def worker_pythonpath() -> str:
    """PYTHONPATH for Ray workers: calray's source root, then whatever this process has."""
    return os.pathsep.join(p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH", "")) if p)


def _auth_hint(address: str) -> str:
    if address == "auto" or os.environ.get("RAY_AUTH_MODE"):
        return ""
    # Ray 2.60 only answers "Failed to connect" (after ~20 s of InvalidAuthToken retries): a client
    # given an explicit address never turns token auth on by itself
    return ("; clusters started by `ray start --head` use token auth: export RAY_AUTH_MODE=token (the token is "
            "~/.ray/auth_token on the head node, or RAY_AUTH_TOKEN), or use --address auto on the head node")


def init_ray(address: str | None, *, key: str = "--address", num_cpus: float | None = None,
             num_gpus: float | None = None, log_to_driver: bool = False,
             logging_level: int = logging.WARNING) -> bool:
    """Start or join Ray unless it already runs; True when this call did (the caller shuts it down).

    `key` names the setting the address came from, for the error when the cluster cannot be reached.
    """
    import ray  # heavy: imported when Ray is needed, so a sweep's --dry-run never loads it

    if ray.is_initialized():
        return False
    pythonpath = worker_pythonpath()
    if address in (None, "local"):
        os.environ["PYTHONPATH"] = pythonpath  # inherited by the local instance's workers
        kwargs = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None}
        ray.init(address="local", log_to_driver=log_to_driver, logging_level=logging_level, **kwargs)
        return True
    try:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging_level,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_CHDIR_TO_TRIAL_DIR": "0"}})
    except Exception as e:  # noqa: BLE001 - ConnectionError, or Ray's own errors for a bad address
        raise ConfigError(f"{key} {address}: cannot connect to a Ray cluster there "
                          f"({type(e).__name__}: {e}){_auth_hint(address)}") from None
    return True


# ---------------------------------------------------------------- shared storage

STORAGE_PROBE_PREFIX = ".calray_storage_check_"  # <dir>/.calray_storage_check_<token>, removed after the check
STORAGE_CHECK_TIMEOUT_S = 120.0  # a node that has not answered by then is reported, not failed


def _storage_probe(path: str, name: str, token: str) -> tuple[bool, str]:
    """Runs on one node: (sees `path` with the driver's token file, what it found)."""
    import socket

    host = socket.gethostname()
    p = Path(path)
    if not p.is_dir():
        return False, f"host {host}: {path} does not exist there"
    try:
        seen = (p / name).read_text().strip()
    except OSError:
        return False, f"host {host}: {path} exists but the driver's token file {name} is not in it (another disk)"
    if seen != token:
        return False, f"host {host}: {path}/{name} holds another token"
    return True, f"host {host}"


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_storage(path: str | Path, *, key: str = "ray.storage_path", what: str = "the sweep directory",
                         timeout_s: float = STORAGE_CHECK_TIMEOUT_S) -> None:
    """On a Ray cluster of more than one alive node, check from a task pinned to every node that
    `path` (created here if missing) and a token file the driver writes in it are visible there;
    a node that cannot see them is one ConfigError naming `key`, the path and the node(s).
    One node: no task, no file (a `ray.nodes()` call). Needs Ray initialised."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _alive_nodes()
    if len(nodes) <= 1:
        return
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    name = STORAGE_PROBE_PREFIX + token[:12]
    (path / name).write_text(token + "\n")
    probe = ray.remote(_storage_probe)
    try:
        refs = {probe.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(path), name, token): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        blind = []
        for ref in ready:
            try:
                ok, detail = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the node died meanwhile: not a storage verdict
                log.warning("storage check on node %s failed: %s", refs[ref]["NodeID"][:8], type(e).__name__)
                continue
            if not ok:
                blind.append(f"node {refs[ref]['NodeID'][:8]} ({refs[ref].get('NodeManagerAddress')}, {detail})")
        for ref in pending:
            log.warning("storage check: node %s did not answer within %.0fs; not checked",
                        refs[ref]["NodeID"][:8], timeout_s)
            ray.cancel(ref, force=True)
    finally:
        (path / name).unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"{key}: {what} {path} is not visible on {len(blind)} of {len(nodes)} Ray nodes: {'; '.join(blind)}; "
            f"a local path is not shared between nodes — use a filesystem mounted at the same path on every node "
            f"(NFS, Lustre, BeeGFS, ...) for {key}")
