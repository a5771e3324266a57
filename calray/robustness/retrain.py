"""The robustness grid's ``train+test`` mode (paper Table III, learning under noise): a target's
config (a sweep's ``best/<cell>.yaml``) retrained under each noise setting (``noise.mode:
train+test``) with several training seeds, as Ray Tune trials (``tune.grid_search`` over the list
of configs, Tune's default searcher, each trial running `calray.ray.trial.run_trial`), and
evaluated on the test split under the same noise. ε = 0 is one clean retrain per seed, shared by
every kind. A retrain whose run directory already holds a ``summary.json`` for the identical
config is reused, so an interrupted grid continues. Replicate i uses training seed
``train_seeds[i]`` and noise seed ``noise_seeds[i % len(noise_seeds)]``.

A final-stage target (a sweep with final.csv: one per cell × final seed) is retrained once per noise
setting with its own final seed as training seed (``train_seeds`` does not apply) and noise seed
``noise_seeds[r % len(noise_seeds)]``, r its position among its cell's final seeds; its retrains are
``final_<kind>_eps<ε>[_<attacked>]_seed<s>``. Each `attacked` modality other than 'all' is a
setting of its own (``..._<attacked>_seed<s>``). The ``missing`` kind is test-mode only: no retrain."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from calray.config import absolute_paths, config_from_dict
from calray.io import ROBUSTNESS_DIR, RUNS_DIR
from calray.ray.batch import FixedRun, finished_summary, refuse_foreign_dirs, run_batch
from calray.robustness.spec import ALL, MISSING, GridSpec
from calray.robustness.tables import make_row
from calray.robustness.targets import Target, say, with_noise

TUNE_DIR = "tune"  # in ROBUSTNESS_DIR: Ray Tune's state of the train+test retrains


def eps_tag(eps: float) -> str:
    return f"{eps:g}".replace(".", "p")


@dataclass
class Retrain:
    target: Target
    kind: str  # 'none' for the clean (ε = 0) retrain
    eps: float
    train_seed: int
    noise_seed: int
    config: dict  # complete run config (absolute paths)
    attacked: str = ALL

    @property
    def run_dir(self) -> Path:
        rt = self.config["runtime"]
        return Path(rt["output_dir"]) / rt["run_name"]


def _replicates(target: Target, spec: GridSpec) -> list[tuple[int, int]]:
    """(training seed, noise seed) of each retrain of one noise setting."""
    noise_seeds = spec.noise_seed_list
    if target.final_seed is not None:
        return [(target.final_seed, noise_seeds[target.replicate % len(noise_seeds)])]
    return [(tseed, noise_seeds[i % len(noise_seeds)]) for i, tseed in enumerate(spec.train_seed_list)]


def _run_name(target: Target, kind: str, eps: float, attacked: str, tseed: int) -> str:
    prefix = "final_" if target.final_seed is not None else ""
    which = "" if attacked == ALL else f"_{attacked}"
    return f"{prefix}{kind}_eps{eps_tag(eps)}{which}_seed{tseed}"


def plan_retrains(target: Target, spec: GridSpec, out_dir: Path) -> list[Retrain]:
    plans = []
    settings: list[tuple[str, float, str]] = []
    if all(k == MISSING for k in spec.kinds):
        return plans  # `missing` is test-mode only
    if any(e == 0 for e in spec.eps):
        settings.append(("none", 0.0, ALL))
    settings += [(k, e, a) for k in spec.kinds if k != MISSING for a in spec.attacked for e in spec.eps if e != 0]
    for kind, eps, attacked in settings:
        for tseed, nseed in _replicates(target, spec):
            cfg = with_noise(target.retrain_config, kind, eps, "train+test", nseed, attacked)
            tree = cfg.to_dict()
            tree["runtime"].update(seed=tseed, progress=False, resume=True,
                                   output_dir=str((out_dir / ROBUSTNESS_DIR / RUNS_DIR / target.cell).resolve()),
                                   run_name=_run_name(target, kind, eps, attacked, tseed))
            if spec.epochs is not None:
                tree["optim"]["epochs"] = spec.epochs
            tree = absolute_paths(tree)  # Ray trials may run in another working directory
            config_from_dict(tree, f"retrain config for {target.label}")  # validate before Ray sees it
            plans.append(Retrain(target, kind, eps, tseed, nseed, tree, attacked))
    return plans


def _fixed_run(plan: Retrain) -> FixedRun:
    return FixedRun(plan.config, label=_retrain_label(plan), cell=plan.target.cell)


def _finished_summary(plan: Retrain) -> dict | None:
    """The summary of an identical, finished retrain (reused instead of training again)."""
    return finished_summary(_fixed_run(plan))


def _setting_label(plan: Retrain) -> str:
    which = "" if plan.attacked == ALL else f" ({plan.attacked})"
    return f"{plan.kind}{which} eps={plan.eps:g} train seed {plan.train_seed}"


def _retrain_label(plan: Retrain) -> str:
    return f"{plan.target.cell} {_setting_label(plan)}"


def _run_tune(plans: list[Retrain], out_dir: Path, spec: GridSpec, address: str | None,
              quiet: bool = False, callbacks: Sequence = ()) -> dict[int, str]:
    """Run the retrains as Ray Tune trials (calray.ray.batch, one progress line per retrain as it
    ends, none when `quiet`); returns {plan index: error message} for failed trials."""
    return run_batch([_fixed_run(p) for p in plans], out_dir / ROBUSTNESS_DIR / TUNE_DIR, "train_test",
                     {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}, address=address,
                     max_concurrent=spec.max_concurrent_trials, quiet=quiet, callbacks=callbacks,
                     tag="robustness", title="robustness train+test")


def prepare_retrains(targets: list[Target], spec: GridSpec, out_dir: Path) -> tuple[list[Retrain], list[Retrain]]:
    """(every retrain, those still to run); a retrain dir left by a different config is refused
    here, before Ray starts."""
    plans = [p for t in targets for p in plan_retrains(t, spec, out_dir)]
    todo = [p for p in plans if _finished_summary(p) is None]
    refuse_foreign_dirs([_fixed_run(p) for p in todo])
    return plans, todo


def evaluate_train_test_grid(targets: list[Target], spec: GridSpec, out_dir: Path,
                             address: str | None = None, quiet: bool = False, callbacks: Sequence = (),
                             prepared: tuple[list[Retrain], list[Retrain]] | None = None) -> list[dict]:
    """The train+test retrains (Tune trials; `callbacks`: more Ray Tune callbacks, e.g. the sweep's
    trackers), their rows, reusing identical finished retrains. `prepared`: `prepare_retrains`' answer."""
    plans, todo = prepared or prepare_retrains(targets, spec, out_dir)
    say(f"train+test: {len(plans)} retrains ({len(plans) - len(todo)} already finished, reused); "
        f"{len(todo)} to run as Ray Tune trials")
    errors: dict[int, str] = {}
    if todo:
        t0 = time.time()
        errors = _run_tune(todo, out_dir, spec, address, quiet=quiet, callbacks=callbacks)
        say(f"train+test: Ray Tune finished {len(todo)} trials in {time.time() - t0:.1f}s "
             f"({len(errors)} failed)")
    failed = {id(todo[i]): msg for i, msg in errors.items()}
    return [r for plan in plans for r in _plan_rows(plan, spec, failed.get(id(plan)), quiet)]


def _plan_rows(plan: Retrain, spec: GridSpec, err: str | None, quiet: bool) -> list[dict]:
    """A retrain's rows: one, or for the clean retrain the ε = 0 row of every kind × attacked choice."""
    summary = _finished_summary(plan)
    if summary is None and err is None:
        err = f"no summary.json in {plan.run_dir} after the trial"
    metrics = summary.get("test") if summary else None
    if plan.kind == "none":
        pairs = [(k, a) for k in spec.kinds if k != MISSING for a in spec.attacked]
    else:
        pairs = [(plan.kind, plan.attacked)]
    rows = [make_row(plan.target, kind, plan.eps, "train+test", plan.train_seed, metrics,
                     train_seed=plan.train_seed, noise_seed=None if plan.eps == 0 else plan.noise_seed,
                     source=str(plan.run_dir), error=None if metrics else err, attacked=attacked)
            for kind, attacked in pairs]
    head = f"{plan.target.label}: train+test {_setting_label(plan)}"
    if metrics:
        if not quiet:  # the summary table below has every number; failures are always shown
            say(f"{head}: acc {metrics['acc']:.4f} macro-F1 {metrics['macro_f1']:.4f}")
    else:
        say(f"{head}: FAILED ({err})")
    return rows
