"""The robustness grid's ``test`` mode (paper Table II, generalisation): a checkpoint evaluated on
the test split rebuilt under each noise setting (``noise.mode: test``), once per noise seed and
`attacked` choice, plus the ``missing`` kind (a modality absent at test time). No Trainer: the model,
its checkpoint and `calray.engine.evaluate.evaluate`.

The unit of work is one (target, kind) — `run_kind`, what one Ray task runs (calray.robustness.tasks)
and what the serial path runs in a loop: the checkpoint is loaded and the clean test set built once,
then every (attacked, ε, noise seed) of that kind is evaluated. ε = 0 is the clean test set, so those
rows equal the checkpoint's plain test accuracy. ``missing`` rows are deterministic (no noise is
drawn): ε = 1 (absent) is evaluated once per attacked modality and repeated for each noise seed, as
the clean rows are, so every (kind, attacked, ε) group of a target has the same n.

``missing`` replaces the absent modality's model input in every test batch
(`calray.data.noise.fill_missing`): ``missing_fill: zero`` (default) feeds zeros; ``mean`` feeds the
training split's mean input of that modality, computed here once per task over the training split
as the evaluation loader reads it (clean: the run's noise is test-mode only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from calray.config import RunConfig
from calray.data.base import build_datasets
from calray.data.noise import fill_missing
from calray.engine.checkpoint import load_checkpoint
from calray.engine.evaluate import evaluate
from calray.engine.loaders import make_loader
from calray.engine.runinfo import seed_everything
from calray.engine.trainer import resolve_device
from calray.errors import CalrayError
from calray.io import BEST_CHECKPOINT, CHECKPOINTS_DIR
from calray.models import build_model
from calray.robustness.spec import MISSING, MISSING_EPS, GridSpec
from calray.robustness.tables import make_row
from calray.robustness.targets import Target, attacked_choices, say, with_noise

Log = Callable[[str], None]


class _Filled:
    """An evaluation loader whose batches have some modalities replaced (`fill_missing`)."""

    def __init__(self, loader, fills: dict):
        self.loader, self.fills = loader, fills

    def __iter__(self):
        for inputs, *rest in self.loader:
            yield (fill_missing(inputs, self.fills), *rest)


class CheckpointEvaluator:
    """A checkpoint's model, loaded once, evaluated on test sets as the trainer's test pass does
    (`calray.engine.evaluate.evaluate` over an evaluation loader: every sample once, in order).

    `cfg` is the config the checkpoint was trained with; its splits give the model's shape. The
    seeds are set as the trainer sets them before building the datasets and the model.
    """

    def __init__(self, cfg: RunConfig, checkpoint: Path):
        self.cfg = cfg
        self.device = resolve_device(cfg.runtime.device)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda and cfg.runtime.amp
        self.channels_last = self.cuda and cfg.runtime.channels_last
        seed_everything(cfg.runtime.seed)
        self.splits = build_datasets(cfg)
        torch.manual_seed(cfg.runtime.seed)
        model = build_model(cfg, self.splits).to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.state = load_checkpoint(checkpoint, map_location=self.device)
        self.model.load_state_dict(self.state["model"])

    def loader(self, dataset):
        return make_loader(dataset, self.cfg.data, train=False, seed=self.cfg.runtime.seed, pin_memory=self.cuda)

    def evaluate(self, dataset, fills: dict | None = None) -> dict:
        """acc, macro_f1, loss, n and acc_<modality> over `dataset`; `fills` {modality: None (zero)
        or a mean input}: those modalities absent (`calray.data.noise.fill_missing`)."""
        loader = self.loader(dataset)
        return evaluate(self.model, _Filled(loader, fills) if fills else loader, self.splits.modalities,
                        self.splits.num_classes, self.device, self.amp, self.channels_last)

    def training_means(self, modalities: list[str]) -> dict:
        """The training split's mean model input of each modality (a dict of means for a text dict)."""
        sums: dict = {}
        count = 0
        for inputs, *_ in self.loader(self.splits.train):
            count += _leaves(inputs[modalities[0]])[0].shape[0]
            for m in modalities:
                sums[m] = _add(sums.get(m), inputs[m])
        return {m: _scale(sums[m], 1.0 / max(count, 1)) for m in modalities}


def _leaves(x):
    return [v for t in x.values() for v in _leaves(t)] if isinstance(x, dict) else [x]


def _add(acc, x):
    if isinstance(x, dict):
        return {k: _add(None if acc is None else acc.get(k), v) for k, v in x.items()}
    s = x.double().sum(0) if x.is_floating_point() else None
    return s if acc is None or s is None else acc + s


def _scale(acc, f: float):
    if isinstance(acc, dict):
        return {k: _scale(v, f) for k, v in acc.items()}
    return None if acc is None else (acc * f).float()


@dataclass(frozen=True)
class Setting:
    """One row's setting within a (target, kind): which modalities, ε, and the noise seed."""

    attacked: str
    eps: float
    seed: int


def kind_settings(spec: GridSpec, kind: str, modalities: list[str] | None) -> list[Setting]:
    """The (attacked, ε, noise seed) rows of one kind, in row order. `missing`: ε 0 (when the grid
    has it) and MISSING_EPS."""
    eps_list = (([0.0] if 0 in spec.eps else []) + [MISSING_EPS]) if kind == MISSING else list(spec.eps)
    return [Setting(a, float(e), s) for a in attacked_choices(spec, kind, modalities)
            for e in eps_list for s in spec.noise_seed_list]


def _row(target: Target, kind: str, st: Setting, metrics: dict | None, error: str | None = None) -> dict:
    deterministic = st.eps == 0 or kind == MISSING
    return make_row(target, kind, st.eps, "test", st.seed, metrics, train_seed=target.config.runtime.seed,
                    noise_seed=None if deterministic else st.seed, source=str(target.checkpoint),
                    error=error, attacked=st.attacked)


def failed_rows(target: Target, kind: str, spec: GridSpec, error: str,
                modalities: list[str] | None = None) -> list[dict]:
    """The rows of a (target, kind) whose evaluation could not run, each with `error`."""
    return [_row(target, kind, st, None, error) for st in kind_settings(spec, kind, modalities or target.modalities)]


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def _evaluator(target: Target) -> tuple[CheckpointEvaluator, RunConfig]:
    if target.checkpoint is None:
        raise CalrayError(f"{target.run_dir}: no checkpoint to evaluate "
                          f"(expected {CHECKPOINTS_DIR}/{BEST_CHECKPOINT})")
    base = target.config.model_copy(deep=True)
    base.runtime.progress = False
    return CheckpointEvaluator(with_noise(base, "none", 0.0, "test", base.noise.seed), target.checkpoint), base


def evaluate_kind(target: Target, kind: str, spec: GridSpec, log: Log = say) -> list[dict]:
    """Load the checkpoint once; evaluate it on the test split under every (attacked, ε, noise seed)
    of `kind`. A setting that fails is its row's failed status; a failure to load raises."""
    evaluator, base = _evaluator(target)
    clean = evaluator.evaluate(evaluator.splits.test)
    log(f"{target.label}: test clean acc {clean['acc']:.4f} macro-F1 {clean['macro_f1']:.4f} "
        f"(checkpoint {target.checkpoint}, epoch {evaluator.state.get('epoch')})")
    mods = evaluator.splits.modalities
    means = evaluator.training_means(mods) if kind == MISSING and spec.missing_fill == "mean" else {}
    settings = kind_settings(spec, kind, mods)
    rows, absent = [], {}
    for done, st in enumerate(settings, 1):
        try:
            if st.eps == 0:
                metrics = clean
            elif kind == MISSING:
                if st.attacked not in absent:
                    absent[st.attacked] = evaluator.evaluate(evaluator.splits.test, {st.attacked: means.get(st.attacked)})
                metrics = absent[st.attacked]
            else:
                metrics = evaluator.evaluate(build_datasets(with_noise(base, kind, st.eps, "test", st.seed,
                                                                       st.attacked)).test)
        except Exception as e:  # noqa: BLE001 - one setting's failure is its row's status
            rows.append(_row(target, kind, st, None, error_line(e)))
            log(f"{target.label}: test {kind} {st.attacked} eps={st.eps:g} noise seed {st.seed}: FAILED ({error_line(e)})")
            continue
        rows.append(_row(target, kind, st, metrics))
        if st.eps != 0:
            log(f"{target.label}: test {kind} {st.attacked} eps={st.eps:g} noise seed {st.seed}: "
                f"acc {metrics['acc']:.4f} macro-F1 {metrics['macro_f1']:.4f} [{done}/{len(settings)}]")
    del evaluator
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def run_kind(target: Target, kind: str, spec: GridSpec, log: Log = say) -> list[dict]:
    """`evaluate_kind`, with a failure to load or evaluate at all turned into failed rows."""
    try:
        return evaluate_kind(target, kind, spec, log)
    except Exception as e:  # noqa: BLE001 - a bad target is its rows' failed status, not a crash
        log(f"{target.label}: test {kind}: FAILED ({error_line(e)})")
        return failed_rows(target, kind, spec, error_line(e))


def kind_task(target: Target, kind: str, spec: GridSpec) -> dict:
    """One Ray task's work (calray.robustness.tasks): `run_kind` with its log lines returned, for
    the driver to print as the result arrives."""
    t0 = time.time()
    lines: list[str] = []
    torch.set_num_threads(max(1, int(spec.cpus_per_trial)))
    rows = run_kind(target, kind, spec, lines.append)
    return {"rows": rows, "lines": lines, "seconds": time.time() - t0}


def evaluate_test_grid(target: Target, spec: GridSpec, log: Log = say) -> list[dict]:
    """The serial path for one target: every kind of the grid, one after another in this process."""
    t0 = time.time()
    rows = [r for kind in spec.kinds for r in run_kind(target, kind, spec, log)]
    log(f"{target.label}: test grid done in {time.time() - t0:.1f}s")
    return rows
