"""The package's layering (docs/ARCHITECTURE.md), checked statically by scripts/architecture_figures.py:
no import cycles, no import up the layer order, no function-level imports of calray modules, and
every module of calray/ belongs to a layer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("architecture_figures", ROOT / "scripts" / "architecture_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_module_has_a_layer(figures):
    for name in figures.modules():
        figures.layer(name)  # KeyError names a module outside LAYERS


def test_no_import_cycles_and_none_up_the_layers(figures):
    f = figures.figures()
    assert f["cycles"] == []
    assert f["upward_imports"] == []


def test_no_function_level_imports_of_calray_modules(figures):
    assert figures.figures()["function_imports"] == []


def test_the_checker_sees_a_violation(figures, tmp_path, monkeypatch):
    """The checks can fail: an engine module importing the sweep layer, inside a function, in a cycle."""
    pkg = tmp_path / "calray"
    for sub in ("engine", "sweep"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "loop.py").write_text("def f():\n    from calray.sweep import runner\n")
    (pkg / "sweep" / "runner.py").write_text("from calray.engine import loop\n")
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    monkeypatch.setattr(figures, "PACKAGE", pkg)
    f = figures.figures()
    assert f["upward_imports"] == ["calray.engine.loop:2 → calray.sweep.runner"]
    assert f["function_imports"] == ["calray.engine.loop:2 → calray.sweep.runner"]
    assert f["cycles"] == [["calray.engine.loop", "calray.sweep.runner"]]


def test_the_checker_sees_a_cycle_through_a_package_init(figures, tmp_path, monkeypatch):
    """`from calray.method import strategies` inside a module that calray/method/__init__.py imports."""
    pkg = tmp_path / "calray"
    (pkg / "method").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "method" / "__init__.py").write_text("from calray.method import plugins\n")
    (pkg / "method" / "plugins.py").write_text("from calray.method import strategies\n")
    (pkg / "method" / "strategies.py").write_text("")
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    monkeypatch.setattr(figures, "PACKAGE", pkg)
    assert figures.figures()["cycles"] == [["calray.method", "calray.method.plugins"]]
