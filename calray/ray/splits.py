"""A worker process's built datasets, reused by the trials it runs (`SplitsCache`).

With one experiment for every cell, consecutive trials in one worker usually belong to different
cells: in the quickstart each worker alternates between the clean and the noisy cell, so a cache
of the last dataset alone rebuilt it for every trial (36 of 36). The cache therefore keeps several
(data, noise) blocks, least recently used first out, while their resident size stays within a
budget; the newest is kept whatever its size.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from calray.config import RunConfig
from calray.data.base import DatasetSplits, build_datasets

WORKER_DATASETS_BYTES = 512 * 2**20  # resident size one worker process keeps datasets for


def resident_bytes(obj, _seen: set | None = None, _depth: int = 0) -> int:
    """An estimate of the memory `obj` holds in tensors and arrays: the storages reachable through
    containers and instance attributes (each counted once). Memory-mapped arrays are file pages,
    not counted; Python objects other than containers are not counted either."""
    seen = set() if _seen is None else _seen
    if _depth > 8 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = ("storage", storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, np.ndarray):
        while isinstance(obj.base, np.ndarray):
            obj = obj.base
        if isinstance(obj, np.memmap) or ("array", id(obj)) in seen:
            return 0
        seen.add(("array", id(obj)))
        return obj.nbytes
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = vars(obj).values()
    else:
        return 0
    return sum(resident_bytes(v, seen, _depth + 1) for v in items)


class SplitsCache:
    """The datasets of recently built (data, noise) blocks, for the next trials with the same
    blocks: least recently used first out while their `resident_bytes` exceed `max_bytes`.
    Thread-safe: Tune runs a function trainable in a thread of its worker process.

    `calray.ray.trial.run_trial` uses `WORKER_SPLITS`, the one instance of the process it runs in:
    Tune runs the trainable in worker processes (several trials per process with
    `ray.reuse_actors`), each importing this module once; nothing of it is pickled. A pickled copy
    would arrive empty.
    """

    def __init__(self, build: Callable[[RunConfig], DatasetSplits] = build_datasets,
                 max_bytes: int = WORKER_DATASETS_BYTES):
        self._build = build
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[DatasetSplits, int]] = OrderedDict()  # oldest first

    @staticmethod
    def key(cfg: RunConfig) -> str:
        return json.dumps({"data": cfg.data.model_dump(mode="json"), "noise": cfg.noise.model_dump(mode="json")},
                          sort_keys=True)

    def get(self, cfg: RunConfig) -> DatasetSplits:
        return self.lookup(cfg)[0]

    def lookup(self, cfg: RunConfig) -> tuple[DatasetSplits, float | None]:
        """The datasets for `cfg` and the seconds it took to build them (None: reused)."""
        key = self.key(cfg)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0], None
            # room for the new blocks before building them, sized like the newest cached ones (a
            # sweep's blocks are alike): one dataset over the budget is freed before the next is built
            expected = next(reversed(self._entries.values()))[1] if self._entries else 0
            self._evict(self.max_bytes - expected)
            start = time.perf_counter()
            splits = self._build(cfg)
            built = time.perf_counter() - start
            self._entries[key] = (splits, resident_bytes(splits))
            self._evict(self.max_bytes, keep=1)
            return splits, built

    def _evict(self, limit: int, keep: int = 0) -> None:
        while len(self._entries) > keep and sum(size for _, size in self._entries.values()) > limit:
            self._entries.popitem(last=False)

    def keys(self) -> list[str]:
        """The cached blocks' keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __getstate__(self):
        return {"build": self._build, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["build"], state["max_bytes"])


WORKER_SPLITS = SplitsCache()  # this process's datasets, shared by the trials it runs
