"""The sweep file: pydantic schema, cell expansion and per-cell run configs.

A sweep file names a base run config (`base:` path relative to the sweep file, or an inline
`run:`), the cells the search is repeated over (datasets × noise settings × optional variants),
the search space over dotted run-config keys, the scheduler, per-trial resources and where Ray
runs and stores. Every problem raises one `ConfigError` naming the file and the key path
(`sweeps/x.yaml: search.space.method.T.loguniform: ...`). See docs/SWEEPS.md.

This module imports neither Ray nor Optuna (`--dry-run` must not need them).
"""

from __future__ import annotations

import copy
import os
import itertools
import random
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calray.config import (NoiseConfig, RunConfig, absolute_paths, apply_overrides, check_seeds, read_yaml, seed_list,
                           validation_error_message)
from calray.errors import ConfigError
from calray.robustness.spec import parse_grid
from calray.sweep.space import Distribution, SearchSpec, alias_keys
from calray.sweep.tracking import TrackingSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ASHASpec(_Strict):
    grace_period: int = Field(1, ge=1)  # epochs before a trial can be stopped
    reduction_factor: float = Field(3.0, gt=1.0)
    max_t: int | None = Field(None, ge=1)  # default: the cell's optim.epochs


class SchedulerSpec(_Strict):
    asha: ASHASpec | None = None


class ResourcesSpec(_Strict):
    workers: int = Field(1, ge=1)  # >1: a Ray Train TorchTrainer (DDP) inside each trial
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    driver_cpus: float = Field(0.5, gt=0.0)  # workers > 1: CPUs of the Tune trial that drives Train

    def trial_resources(self) -> dict[str, float]:
        """One Tune trial's Ray resources: its own, or (workers > 1) the driver of a TorchTrainer whose
        workers reserve theirs."""
        if self.workers > 1:
            return {"cpu": self.driver_cpus}
        return {"cpu": self.cpus_per_worker, "gpu": self.gpus_per_worker}

    @model_validator(mode="after")
    def _whole_gpus_for_ddp(self):
        if self.workers > 1 and self.gpus_per_worker and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError("gpus_per_worker must be a whole number when workers > 1 "
                             "(NCCL rejects two ranks on one GPU)")
        return self


class RaySpec(_Strict):
    address: str | None = None  # None: start a local Ray; "auto" or host:port: join a cluster
    storage_path: str = "runs/sweeps"  # outputs go to <storage_path>/<name>/ (relative: to the CWD)
    num_cpus: int | None = Field(None, ge=1)  # local Ray only: logical CPUs (may overcommit)
    num_gpus: int | None = Field(None, ge=0)
    reuse_actors: bool = True  # trials share worker processes: no re-import of torch, datasets cached


class DatasetCell(_Strict):
    name: str  # the cell id part, and data.dataset unless `set`/`base` says otherwise
    base: str | None = None  # a run config for this dataset (relative to the sweep file)
    run: dict[str, Any] | None = None  # or an inline run config
    set: dict[str, Any] = Field(default_factory=dict)  # dotted overrides
    noise: list["NoiseCell"] | None = None  # this dataset's noise cells (default: cells.noise)

    @model_validator(mode="after")
    def _one_source(self):
        if self.base is not None and self.run is not None:
            raise ValueError("give base or run, not both")
        return self


class NoiseCell(BaseModel):  # noqa: D101 (defined after DatasetCell, which refers to it)
    """kind + eps (number or list) + mode (string or list); other NoiseConfig keys are fixed."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["none", "gaussian", "salt_pepper"] = "none"
    eps: float | list[float] = 0.0
    mode: Literal["test", "train+test"] | list[Literal["test", "train+test"]] = "test"


class VariantCell(_Strict):
    name: str
    set: dict[str, Any] = Field(default_factory=dict)
    # this variant's own search space, replacing search.space (same num_samples: an equal budget), so a
    # method searches only the keys that act on it; {} runs num_samples trials of its config as given
    space: dict[str, Distribution] | None = None

    @field_validator("space", mode="before")
    @classmethod
    def _aliases(cls, v):
        return alias_keys(v)


class FinalSpec(_Strict):
    """The comparison protocol (docs/SWEEPS.md): each cell's best config retrained with training and
    data seed s for every s in `seeds` (the same seeds in every cell: paired), each variant compared
    with `baseline` per dataset × noise on `metrics` (paired t with a `confidence` t-interval)."""

    seeds: int | list[int] = 5  # a count N (seeds 0..N-1) or an explicit list
    baseline: str | None = None  # a cells.variants name; None: no comparison, multi-seed estimates only
    metrics: list[Literal["test_acc", "test_macro_f1"]] = Field(default_factory=lambda: ["test_acc", "test_macro_f1"])
    confidence: float = Field(0.95, gt=0.0, lt=1.0)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        return check_seeds(v)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError(f"list at least one metric, without duplicates (got {v})")
        return v

    @property
    def seed_list(self) -> list[int]:
        return seed_list(self.seeds)


class CellsSpec(_Strict):
    dataset: list[str | DatasetCell] | None = None  # None: the base config's dataset
    noise: list[NoiseCell] = Field(default_factory=lambda: [NoiseCell()])
    variants: list[VariantCell] | None = None  # e.g. strategies or ablation modes, one cell each


DatasetCell.model_rebuild()


class SweepSpec(_Strict):
    name: str
    description: str | None = None
    base: str | None = None  # run config path, relative to the sweep file
    run: dict[str, Any] | None = None  # or an inline run config
    set: dict[str, Any] = Field(default_factory=dict)  # dotted overrides applied to every cell
    cells: CellsSpec = Field(default_factory=CellsSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent_trials: int | None = Field(None, ge=1)  # the whole sweep's (None: as many as the cluster holds)
    max_concurrent_trials_per_cell: int | None = Field(None, ge=1)  # one cell's (None: no cap of its own)
    max_failures: int = Field(0, ge=0)  # retries of a failed trial (a NaN run fails again: keep 0)
    ray: RaySpec = Field(default_factory=RaySpec)
    robustness: dict[str, Any] | None = None  # passed to calray.robustness.grid.run_grid
    tracking: TrackingSpec | None = None  # MLflow / W&B (calray.sweep.tracking)
    final: FinalSpec | None = None  # multi-seed retrains of each cell's best config + paired comparison

    @field_validator("name")
    @classmethod
    def _slug_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("name must be a filesystem-safe slug (letters, digits, _ . -)")
        return v

    @field_validator("scheduler", mode="before")
    @classmethod
    def _none_scheduler(cls, v):
        return None if v in ("none", "null", "fifo") else v

    @model_validator(mode="after")
    def _variants_fit_the_protocol(self):
        variants = self.cells.variants or []
        own = [v.name for v in variants if v.space is not None]
        if own and self.search.algorithm == "grid":
            raise ValueError(f"cells.variants: {', '.join(own)} give their own space; that needs search.algorithm "
                             "optuna or random (a grid's size would differ per variant: unequal budgets)")
        if self.final is not None and self.final.baseline is not None:
            names = [v.name for v in variants]
            if self.final.baseline not in names:
                raise ValueError(f"final.baseline: {self.final.baseline!r} is not a variant "
                                 f"(cells.variants: {', '.join(names) or 'none'})")
        return self


# ---------------------------------------------------------------- cells


class Cell(BaseModel):
    """One cell: a dataset × a noise setting (× a variant), with its complete run-config dict."""

    id: str
    dataset: str
    noise: dict[str, Any]
    variant: str | None = None
    run: dict[str, Any]  # complete, validated, paths absolute
    source: str  # where the run config came from (for messages)
    space: dict[str, Distribution] = Field(default_factory=dict)  # search.space or the variant's own

    def summary(self) -> dict[str, Any]:
        n = {"kind": self.noise.get("kind", "none"), "eps": self.noise.get("eps", 0.0),
             "mode": self.noise.get("mode", "test")}
        out = {"cell": self.id, "dataset": self.dataset, "noise": n}
        if self.variant is not None:
            out["variant"] = self.variant
        return out


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_").lower()
    return s or "x"


def _num_slug(x: float) -> str:
    return (f"{x:g}").replace(".", "p").replace("-", "m")


def noise_slug(noise: dict) -> str:
    kind = noise.get("kind", "none")
    if kind == "none":
        return "none"
    mode = noise.get("mode", "test")
    return f"{kind}_eps{_num_slug(float(noise.get('eps', 0.0)))}_{slug(mode)}"


def expand_noise(cell: NoiseCell) -> list[dict]:
    """A noise cell with eps/mode lists → one noise dict per (eps, mode)."""
    extra = dict(cell.model_extra or {})
    if cell.kind == "none":
        return [{"kind": "none", "eps": 0.0, "mode": "test", **extra}]
    eps_list = cell.eps if isinstance(cell.eps, list) else [cell.eps]
    mode_list = cell.mode if isinstance(cell.mode, list) else [cell.mode]
    return [{"kind": cell.kind, "eps": float(e), "mode": m, **extra} for e, m in itertools.product(eps_list, mode_list)]


class SweepPlan(BaseModel):
    """A validated sweep: the spec, the file it came from and its expanded cells."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    spec: SweepSpec
    path: Path
    cells: list[Cell]

    def num_samples(self) -> int:
        s = self.spec.search
        if s.algorithm == "grid" and "num_samples" not in s.model_fields_set:
            return s.grid_size()
        return s.num_samples


def _base_tree(spec: SweepSpec, sweep_path: Path) -> tuple[dict | None, str]:
    if spec.base is not None and spec.run is not None:
        raise ConfigError(f"{sweep_path}: base: give base or run, not both")
    if spec.run is not None:
        return copy.deepcopy(spec.run), f"{sweep_path} (run:)"
    if spec.base is not None:
        path = (sweep_path.parent / spec.base)
        if not path.is_file():
            raise ConfigError(f"{sweep_path}: base: run config {spec.base!r} not found (looked at {path})")
        return read_yaml(path), os.path.normpath(path)
    return None, str(sweep_path)


def _validate_run(tree: dict, source: str, context: str) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(validation_error_message(e, f"{source} [{context}]")) from None


def _apply(tree: dict, overrides: dict, source: str, key_path: str) -> dict:
    try:
        return apply_overrides(tree, overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: {key_path}: {e}") from None


def build_cells(spec: SweepSpec, sweep_path: Path, cwd: Path | None = None) -> list[Cell]:
    cwd = cwd or Path.cwd()
    src = str(sweep_path)
    base, base_source = _base_tree(spec, sweep_path)
    datasets = spec.cells.dataset
    if datasets is None:
        if base is None:
            raise ConfigError(f"{src}: base: give a base run config (base: or run:) or cells.dataset entries with base")
        datasets = [DatasetCell(name=str(base.get("data", {}).get("dataset", "synthetic")))]
    def expand(noise_cells: list[NoiseCell], where: str) -> list[dict]:
        out = []
        for i, n in enumerate(noise_cells):
            for d in expand_noise(n):
                try:
                    NoiseConfig.model_validate(d)
                except ValidationError as e:
                    raise ConfigError(validation_error_message(e, src, prefix=f"{where}.{i}")) from None
                out.append(d)
        return out

    default_noises = expand(spec.cells.noise, "cells.noise")
    variants = spec.cells.variants or [None]
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for di, ds in enumerate(datasets):
        if isinstance(ds, str):
            ds = DatasetCell(name=ds, set={"data.dataset": ds})
        if ds.run is not None:
            tree, source = copy.deepcopy(ds.run), f"{src} (cells.dataset.{di}.run)"
        elif ds.base is not None:
            path = sweep_path.parent / ds.base
            if not path.is_file():
                raise ConfigError(f"{src}: cells.dataset.{di}.base: run config {ds.base!r} not found (looked at {path})")
            tree, source = read_yaml(path), os.path.normpath(path)
        elif base is not None:
            tree, source = copy.deepcopy(base), base_source
        else:
            raise ConfigError(f"{src}: cells.dataset.{di}: needs base/run (the sweep has no base)")
        tree = _apply(tree, spec.set, src, "set")
        tree = _apply(tree, ds.set, src, f"cells.dataset.{di}.set")
        noises = default_noises if ds.noise is None else expand(ds.noise, f"cells.dataset.{di}.noise")
        for noise in noises:
            for vi, var in enumerate(variants):
                t = copy.deepcopy(tree)
                t["noise"] = {**(t.get("noise") or {}), **noise}
                if var is not None:
                    t = _apply(t, var.set, src, f"cells.variants.{vi}.set")
                t = absolute_paths(t, cwd)  # Ray workers may run in another working directory
                parts = [slug(ds.name), noise_slug(noise)] + ([slug(var.name)] if var is not None else [])
                cid = "__".join(parts)
                if cid in seen:
                    raise ConfigError(f"{src}: cells: two cells have the id {cid!r}; give them distinct names")
                seen[cid] = cid
                _validate_run(t, source, f"cell {cid}")
                own = var is not None and var.space is not None
                cells.append(Cell(id=cid, dataset=ds.name, noise=noise, variant=None if var is None else var.name,
                                  run=RunConfig.model_validate(t).to_dict(), source=source,
                                  space=var.space if own else spec.search.space))
    _check_spaces(spec, cells, src)
    return cells


def _check_spaces(spec: SweepSpec, cells: list[Cell], src: str) -> None:
    """Every distinct space, against the first cell that searches it."""
    checked: set[str] = set()
    own = {v.name for v in spec.cells.variants or [] if v.space is not None}
    for cell in cells:
        where = f"cells.variants[{cell.variant}].space" if cell.variant in own else "search.space"
        if where not in checked:
            checked.add(where)
            _check_space(cell, src, where)


def _check_space(cell: Cell, src: str, where: str) -> None:
    """Every searched key must be a run-config key taking that kind of value."""
    for key, dist in cell.space.items():
        for value in dist.check_values():
            try:
                tree = apply_overrides(cell.run, {key: value})
                RunConfig.model_validate(tree)
            except ConfigError as e:
                raise ConfigError(f"{src}: {where}.{key}: {e}") from None
            except ValidationError as e:
                first = e.errors()[0]
                msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
                raise ConfigError(f"{src}: {where}.{key}: {msg} (value {value!r})") from None


def load_sweep(path: str | Path, num_samples: int | None = None, cwd: Path | None = None) -> SweepPlan:
    """Read and validate a sweep file; expand its cells. Raises one ConfigError per problem."""
    path = Path(path)
    tree = read_yaml(path)
    if num_samples is not None:
        tree.setdefault("search", {})
        if isinstance(tree["search"], dict):
            tree["search"]["num_samples"] = num_samples
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(validation_error_message(e, str(path))) from None
    if spec.robustness is not None:  # fail now, not after every trial has run
        parse_grid(spec.robustness, source=str(path), prefix="robustness")
    cells = build_cells(spec, path, cwd)
    return SweepPlan(spec=spec, path=path, cells=cells)


def example_params(spec: SweepSpec, cell: Cell | None = None, seed: int | None = None) -> dict[str, Any]:
    """One trial's sampled values of `cell`'s space (default: search.space), without Ray or Optuna."""
    rng = random.Random(spec.search.seed if seed is None else seed)
    space = cell.space if cell is not None else spec.search.space
    return {k: d.sample(rng) for k, d in space.items()}


def stored_spec(plan: SweepPlan) -> dict:
    """The validated sweep as written to <sweep dir>/sweep.yaml (base path made absolute)."""
    d = plan.spec.model_dump(mode="json", exclude_none=True)
    if plan.spec.base is not None:
        d["base"] = str((plan.path.parent / plan.spec.base).resolve())
    for ds in d.get("cells", {}).get("dataset") or []:
        if isinstance(ds, dict) and ds.get("base"):
            ds["base"] = str((plan.path.parent / ds["base"]).resolve())
    return d
