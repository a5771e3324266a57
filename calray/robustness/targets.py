"""What the robustness grid evaluates: a `Target` per sweep cell (its best run and best config), per
final run of a sweep with a final stage (final.csv: one per (cell, seed)), or for one run directory /
checkpoint; the noisy variants of a target's config; the check of the grid's `attacked` names."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from calray.config import RunConfig, config_from_dict, load_config
from calray.errors import CalrayError, ConfigError
from calray.io import BEST_CHECKPOINT, BEST_DIR, CELLS_FILE, CHECKPOINTS_DIR, CONFIG_FILE, FINAL_CSV, SUMMARY_FILE
from calray.robustness.spec import ALL, MISSING, GridSpec


def say(msg: str) -> None:
    print(f"[robustness] {msg}", flush=True)


@dataclass
class Target:
    cell: str
    config: RunConfig  # the config the checkpoint was trained with (test mode)
    retrain_config: RunConfig  # the config retrained in train+test mode
    checkpoint: Path | None
    run_dir: Path | None
    final_seed: int | None = None  # a final-stage run's seed (None: a best-trial or plain run target)
    replicate: int = 0  # position among its cell's final seeds (train+test: which noise seed it cycles to)

    @property
    def dataset(self) -> str:
        return self.config.data.dataset

    @property
    def label(self) -> str:
        return self.cell if self.final_seed is None else f"{self.cell} seed {self.final_seed}"

    @property
    def modalities(self) -> list[str] | None:
        """The model's modalities as its run recorded them (summary.json), None when unknown."""
        if self.run_dir is None or not (self.run_dir / SUMMARY_FILE).is_file():
            return None
        try:
            mods = json.loads((self.run_dir / SUMMARY_FILE).read_text()).get("modalities")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return [str(m) for m in mods] if isinstance(mods, list) else None

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


def _cell_wanted(cell: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(cell, p) for p in patterns)


def best_trial_targets(sweep_dir: Path, cell_patterns: list[str] | None) -> list[Target]:
    """A target per cell of cells.json: its best run's checkpoint, retrained from best/<cell>.yaml."""
    targets = []
    for rec in read_cells(sweep_dir):
        cell = str(rec["cell"])
        if not _cell_wanted(cell, cell_patterns):
            continue
        run_dir = _resolve(sweep_dir, rec.get("best_run_dir"))
        best_yaml = _resolve(sweep_dir, rec.get("best_config") or f"{BEST_DIR}/{cell}.yaml")
        if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
            say(f"cell {cell}: no best run to evaluate (status {rec.get('status')!r}); skipped")
            continue
        t = run_target(run_dir)
        t.cell = cell
        if best_yaml is not None and best_yaml.is_file():
            t.retrain_config = load_config(best_yaml)
        targets.append(t)
    return targets


def read_final(sweep_dir: Path) -> pd.DataFrame:
    path = sweep_dir / FINAL_CSV
    try:
        df = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - pandas' parser errors on a truncated file
        raise CalrayError(f"{path}: cannot read the final stage's table ({type(e).__name__}: {e})") from None
    missing = [c for c in ("cell", "seed", "status", "run_dir") if c not in df.columns]
    if missing:
        raise CalrayError(f"{path}: no column(s) {missing} (expected the final stage's columns, docs/SWEEPS.md)")
    return df


def final_targets(sweep_dir: Path, cell_patterns: list[str] | None) -> list[Target]:
    """A target per ok row of final.csv (one per cell × seed): the final run's best.pt, tested with
    and retrained from that run's config.yaml (runtime.seed = data.seed = the final seed)."""
    df = read_final(sweep_dir)
    targets = []
    for cell, rows in df.groupby("cell", sort=False):
        if not _cell_wanted(str(cell), cell_patterns):
            continue
        for rec in rows.to_dict("records"):
            seed = rec["seed"]
            if rec["status"] != "ok" or not isinstance(rec["run_dir"], str):
                say(f"cell {cell} final seed {seed}: status {rec['status']!r}; skipped")
                continue
            run_dir = _resolve(sweep_dir, rec["run_dir"])
            if not (run_dir / CONFIG_FILE).is_file():
                say(f"cell {cell} final seed {seed}: {run_dir} has no config.yaml; skipped")
                continue
            t = run_target(run_dir)
            t.cell, t.final_seed = str(cell), int(seed)
            targets.append(t)
    for cell_targets in _by_cell(targets).values():  # noise-seed cycling follows the seed order
        for i, t in enumerate(sorted(cell_targets, key=lambda x: x.final_seed)):
            t.replicate = i
    return targets


def _by_cell(targets: list[Target]) -> dict[str, list[Target]]:
    out: dict[str, list[Target]] = {}
    for t in targets:
        out.setdefault(t.cell, []).append(t)
    return out


def resolve_targets(path: Path, cell_patterns: list[str] | None = None) -> tuple[Path, str, list[Target]]:
    """(output directory, kind 'sweep'|'final'|'run', targets) for a sweep dir (its final runs when
    it has final.csv, else each cell's best run), run dir or checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise CalrayError(f"{path}: no such sweep directory, run directory or checkpoint")
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
        return run_dir, "run", [run_target(run_dir, checkpoint=path)]
    if (path / FINAL_CSV).is_file():
        targets = final_targets(path, cell_patterns)
        if not targets:
            which = f" matching {cell_patterns}" if cell_patterns else ""
            raise CalrayError(f"{path / FINAL_CSV}: no ok final run of a cell{which}")
        return path, "final", targets
    if (path / CELLS_FILE).is_file():
        targets = best_trial_targets(path, cell_patterns)
        if not targets:
            which = f" matching {cell_patterns}" if cell_patterns else ""
            raise CalrayError(f"{path}: no cell{which} with a finished best run in cells.json")
        return path, "sweep", targets
    if (path / CONFIG_FILE).is_file():
        return path, "run", [run_target(path)]
    raise CalrayError(f"{path}: not a sweep directory (no cells.json) nor a run directory (no config.yaml)")


def check_attacked(targets: list[Target], spec: GridSpec) -> None:
    """Every `attacked` name other than 'all' must be a modality of every target (when known)."""
    names = [a for a in spec.attacked if a != ALL]
    for t in targets:
        mods = t.modalities
        if mods is None or not names:
            continue
        unknown = [a for a in names if a not in mods]
        if unknown:
            raise ConfigError(f"robustness grid: attacked: {unknown} is not a modality of {t.label} "
                              f"({t.dataset}: {mods}); use 'all' or one of {mods}")


def attacked_choices(spec: GridSpec, kind: str, modalities: list[str] | None) -> list[str]:
    """The `attacked` values a kind gets rows for. For `missing`, 'all' stands for each modality in
    turn (every modality absent at once leaves the model no input)."""
    if kind != MISSING:
        return list(spec.attacked)
    out: list[str] = []
    for a in spec.attacked:  # modalities unknown (a failed target's rows): 'all' stays one row
        for m in ((modalities if modalities is not None else [ALL]) if a == ALL else [a]):
            if m not in out:
                out.append(m)
    return out


def with_noise(cfg: RunConfig, kind: str, eps: float, mode: str, seed: int, attacked: str = ALL) -> RunConfig:
    """`cfg` under noise (kind, ε, mode, seed); `attacked` a modality name sets noise.modalities to it.
    The `missing` kind is not a noise setting: its config is the clean one (calray.data.noise.fill_missing)."""
    tree = cfg.to_dict()
    noise = dict(tree.get("noise") or {})
    if eps == 0 or kind == MISSING:
        noise.update(kind="none", eps=0.0, mode=mode, seed=seed)
    else:
        noise.update(kind=kind, eps=float(eps), mode=mode, seed=seed)
        if attacked != ALL:
            noise["modalities"] = [attacked]
    tree["noise"] = noise
    return config_from_dict(tree, f"{cfg.name} with noise {kind} eps={eps:g}")
