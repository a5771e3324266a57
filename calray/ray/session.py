"""The one Ray initialisation every layer uses (CLI runs with --workers, sweeps, robustness retrains).

- address None or "local": a new local instance (`address="local"`, so a `ray start` cluster on
  this machine is never joined by accident); its workers inherit this process's environment.
- "auto" or host:port: a running cluster. Its workers do not inherit this shell's environment, so
  PYTHONPATH (calray's source root first, for a checkout that is not installed) and
  RAY_CHDIR_TO_TRIAL_DIR=0 (trials keep the driver's working directory) go in the runtime_env.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from calray.errors import ConfigError

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
