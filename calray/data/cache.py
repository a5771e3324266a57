"""Decode-once disk cache: memory-mapped arrays filled lazily, shared by epochs, workers and trials.

A cache lives in `<data.cache_dir>/<dataset>/<key>/` where `key` hashes everything the cached
values depend on (dataset root, sample list, decode and transform settings), so a change of any
setting gets a fresh cache and never a stale one. Each array has one row per sample plus a
`filled` flag per row; a row is written before its flag, and because a row's content is a
deterministic function of the key, two processes racing to fill the same row write identical
bytes. Memory maps are opened lazily in each process (never pickled into DataLoader workers).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np


def cache_key(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir_for(root: str | os.PathLike, dataset: str, settings: dict) -> Path:
    """Create (once) and return the directory of the cache keyed by `settings`."""
    key = cache_key(settings)
    path = Path(root) / dataset / key
    path.mkdir(parents=True, exist_ok=True)
    meta = path / "meta.json"
    if not meta.exists():
        tmp = path / f".meta.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(settings, sort_keys=True, indent=1, default=str))
        os.replace(tmp, meta)
    return path


def _create_npy(path: Path, shape: tuple, dtype) -> None:
    """Create a zero-filled .npy once: written aside, then hard-linked into place.

    A link never replaces an existing file, so when processes race the first one wins and no
    process keeps writing into a file another has swapped out (which could pair a filled flag
    with an empty row).
    """
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(path)}.tmp")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    del arr
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


class RowCache:
    """`n_rows` rows of one fixed shape and dtype, stored in `<directory>/<name>.npy`."""

    def __init__(self, directory: Path, name: str, n_rows: int, row_shape: tuple, dtype):
        self.directory = Path(directory)
        self.name = name
        self.shape = (int(n_rows),) + tuple(int(s) for s in row_shape)
        self.dtype = np.dtype(dtype)
        self._data = None
        self._flags = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = state["_flags"] = None
        return state

    def _open(self) -> None:
        if self._data is not None:
            return
        data_path = self.directory / f"{self.name}.npy"
        flag_path = self.directory / f"{self.name}.filled.npy"
        _create_npy(data_path, self.shape, self.dtype)
        _create_npy(flag_path, (self.shape[0],), np.uint8)
        data = np.load(data_path, mmap_mode="r+")
        if data.shape != self.shape or data.dtype != self.dtype:
            raise RuntimeError(f"cache {data_path} holds {data.dtype}{data.shape}, expected {self.dtype}{self.shape}")
        self._data = data
        self._flags = np.load(flag_path, mmap_mode="r+")

    def filled(self, i: int) -> bool:
        self._open()
        return bool(self._flags[i])

    def get(self, i: int, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """Row `i`, computed and stored on first use; always a private copy."""
        self._open()
        if self._flags[i]:
            return np.array(self._data[i])
        value = np.asarray(compute(), dtype=self.dtype)
        if value.shape != self.shape[1:]:
            raise ValueError(f"cache row of shape {value.shape}, expected {self.shape[1:]}")
        self._data[i] = value
        self._flags[i] = 1
        return value

    def n_filled(self) -> int:
        self._open()
        return int(self._flags.sum())
