"""The decode-once row cache: keyed directories, lazy filling, sharing across processes and pickling."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest

from calray.data.cache import RowCache, cache_dir_for, cache_key


def row_value(i: int) -> np.ndarray:
    return np.full((3, 4), i + 1, dtype=np.float32)


def fill(directory, rows):
    cache = RowCache(directory, "x", 8, (3, 4), np.float32)
    for i in rows:
        cache.get(i, lambda i=i: row_value(i))


def test_keys_and_meta(tmp_path):
    a = cache_dir_for(tmp_path, "ks", {"size": 224, "ids": ["a", "b"]})
    b = cache_dir_for(tmp_path, "ks", {"ids": ["a", "b"], "size": 224})
    c = cache_dir_for(tmp_path, "ks", {"size": 112, "ids": ["a", "b"]})
    assert a == b != c
    assert a.name == cache_key({"size": 224, "ids": ["a", "b"]}) and (a / "meta.json").is_file()


def test_rows_are_computed_once_and_persist(tmp_path):
    calls = []
    cache = RowCache(tmp_path, "x", 4, (3, 4), np.float32)

    def compute():
        calls.append(1)
        return row_value(2)

    assert np.array_equal(cache.get(2, compute), row_value(2))
    got = cache.get(2, compute)
    got[:] = 0  # callers get private copies
    assert np.array_equal(cache.get(2, compute), row_value(2)) and len(calls) == 1
    again = RowCache(tmp_path, "x", 4, (3, 4), np.float32)  # a later run
    assert again.filled(2) and not again.filled(1) and again.n_filled() == 1
    assert np.array_equal(again.get(2, lambda: pytest.fail("recomputed")), row_value(2))
    with pytest.raises(ValueError, match="shape"):
        again.get(0, lambda: np.zeros((2, 2)))
    with pytest.raises(RuntimeError, match="expected"):
        RowCache(tmp_path, "x", 5, (3, 4), np.float32).get(0, lambda: row_value(0))


def test_pickling_does_not_copy_the_map(tmp_path):
    cache = RowCache(tmp_path, "x", 1000, (64, 64), np.float32)
    cache.get(0, lambda: np.ones((64, 64), np.float32))
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000  # the 16 MB array stays on disk
    assert np.array_equal(pickle.loads(blob).get(0, lambda: pytest.fail("recomputed")), np.ones((64, 64)))


def test_processes_share_and_race_safely(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=fill, args=(tmp_path, rows)) for rows in ([0, 1, 2, 3, 4], [3, 4, 5, 6, 7])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    cache = RowCache(tmp_path, "x", 8, (3, 4), np.float32)
    assert cache.n_filled() == 8
    for i in range(8):
        assert np.array_equal(cache.get(i, lambda: pytest.fail("recomputed")), row_value(i))
