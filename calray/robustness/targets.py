"""What the robustness grid evaluates: a `Target` per sweep cell (its best run and best config) or
for one run directory / checkpoint, and the noisy variants of a target's config."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from calray.config import RunConfig, config_from_dict, load_config
from calray.errors import CalrayError
from calray.io import BEST_CHECKPOINT, BEST_DIR, CELLS_FILE, CHECKPOINTS_DIR, CONFIG_FILE


def say(msg: str) -> None:
    print(f"[robustness] {msg}", flush=True)


@dataclass
class Target:
    cell: str
    config: RunConfig  # the config the checkpoint was trained with (test mode)
    retrain_config: RunConfig  # the config retrained in train+test mode
    checkpoint: Path | None
    run_dir: Path | None

    @property
    def dataset(self) -> str:
        return self.config.data.dataset

    @property
    def strategy(self) -> str:
        return self.config.method.strategy


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalrayError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


def _resolve(base: Path, p: str | None) -> Path | None:
    if not p:
        return None
    path = Path(p)
    if path.is_absolute():
        return path
    for candidate in (base / path, Path.cwd() / path):
        if candidate.exists():
            return candidate
    return base / path


def run_config(run_dir: Path) -> RunConfig:
    return load_config(run_dir / CONFIG_FILE)


def run_target(run_dir: Path, checkpoint: Path | None = None) -> Target:
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise CalrayError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = run_config(run_dir)
    ckpt = checkpoint or run_dir / CHECKPOINTS_DIR / BEST_CHECKPOINT
    return Target(cell=run_dir.name, config=cfg, retrain_config=cfg,
                  checkpoint=ckpt if ckpt.is_file() else None, run_dir=run_dir)


def read_cells(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / CELLS_FILE
    cells = _load_json(path, "the sweep's cell list")
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "cell" in c for c in cells):
        raise CalrayError(f"{path}: expected a list of cell records, each with a 'cell' key")
    return cells


def resolve_targets(path: Path, cell_patterns: list[str] | None = None) -> tuple[Path, str, list[Target]]:
    """(output directory, kind 'sweep'|'run', targets) for a sweep dir, run dir or checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise CalrayError(f"{path}: no such sweep directory, run directory or checkpoint")
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
        return run_dir, "run", [run_target(run_dir, checkpoint=path)]
    if (path / CELLS_FILE).is_file():
        targets = []
        for rec in read_cells(path):
            cell = str(rec["cell"])
            if cell_patterns and not any(fnmatch.fnmatchcase(cell, p) for p in cell_patterns):
                continue
            run_dir = _resolve(path, rec.get("best_run_dir"))
            best_yaml = _resolve(path, rec.get("best_config") or f"{BEST_DIR}/{cell}.yaml")
            if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
                say(f"cell {cell}: no best run to evaluate (status {rec.get('status')!r}); skipped")
                continue
            t = run_target(run_dir)
            t.cell = cell
            if best_yaml is not None and best_yaml.is_file():
                t.retrain_config = load_config(best_yaml)
            targets.append(t)
        if not targets:
            which = f" matching {cell_patterns}" if cell_patterns else ""
            raise CalrayError(f"{path}: no cell{which} with a finished best run in cells.json")
        return path, "sweep", targets
    if (path / CONFIG_FILE).is_file():
        return path, "run", [run_target(path)]
    raise CalrayError(f"{path}: not a sweep directory (no cells.json) nor a run directory (no config.yaml)")


def with_noise(cfg: RunConfig, kind: str, eps: float, mode: str, seed: int) -> RunConfig:
    tree = cfg.to_dict()
    noise = dict(tree.get("noise") or {})
    if eps == 0:
        noise.update(kind="none", eps=0.0, mode=mode, seed=seed)
    else:
        noise.update(kind=kind, eps=float(eps), mode=mode, seed=seed)
    tree["noise"] = noise
    return config_from_dict(tree, f"{cfg.name} with noise {kind} eps={eps:g}")
