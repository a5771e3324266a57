"""Files written through the atomic writer get the umask's mode (0644 under 022, 0600 under 077),
like a plain open(); the temp file beside them never stays behind."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from calray.io import atomic_write_bytes, atomic_write_text, current_umask, write_json
from calray.engine.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def umask():
    """umask(value): set the process umask for this test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "summary.json", {"acc": 0.5})
    atomic_write_text(tmp_path / "report.html", "<p>hi</p>")
    save_checkpoint({"epoch": 1}, tmp_path / "checkpoints" / "best.pt")
    for name in ("summary.json", "report.html", "checkpoints/best.pt"):
        assert _mode(tmp_path / name) == expected, (name, oct(_mode(tmp_path / name)))
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt") == {"epoch": 1}
    # an existing file is replaced by one with the current umask's mode
    umask(0o077)
    write_json(tmp_path / "summary.json", {"acc": 0.6})
    assert _mode(tmp_path / "summary.json") == 0o600
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_reading_the_umask_leaves_it_unchanged(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_file(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "cells.json"
    atomic_write_text(target, "old\n")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_bytes(target, broken)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.json"]


def test_sweep_outputs_and_report_images_get_the_umask_mode(tmp_path, umask):
    """sweep_results' tables and best/<cell>.yaml and the report's images go through the same writer."""
    from calray.report.render import Block, Section, render_md
    from calray.sweep.outputs import _write_table, write_best_config

    umask(0o022)
    write_best_config(tmp_path / "best" / "c.yaml", {"name": "c"}, "best trial t1")
    _write_table(pd.DataFrame({"trial_id": ["t1"], "epoch": [0], "val_acc": [0.5]}), tmp_path)
    files = tmp_path / "report_files"
    render_md("t", [Section("s", "S", [Block("img", b"\x89PNG", ("a.png", "alt"))])], "", files)
    for path in (tmp_path / "best" / "c.yaml", tmp_path / "trials.parquet", tmp_path / "trials.csv",
                 files / "a.png"):
        assert _mode(path) == 0o644, (path, oct(_mode(path)))
    assert (tmp_path / "best" / "c.yaml").read_text().startswith("# best trial t1\n")
    assert len(pd.read_parquet(tmp_path / "trials.parquet")) == 1
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []
