"""The persisted Optuna studies (``optuna.journal``, one per cell): loading them, the
hyper-parameter importance estimate and the optimisation history's points. Optuna is imported on
first use."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from calray.report.errors import ReportError
from calray.report.loading import ReportData

MIN_TRIALS_FOR_IMPORTANCE = 4  # fewer completed trials: importance is not estimated (a note says so)
FEW_TRIALS_FOR_IMPORTANCE = 10  # below this the estimate is flagged as indicative only


def _load_study(journal: Path, cell: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        storage = JournalStorage(JournalFileBackend(str(journal)))
    except Exception as e:
        raise ReportError(f"{journal}: corrupt Optuna journal ({type(e).__name__}: {e})") from None
    names = [st.study_name for st in storage.get_all_studies()]
    if cell not in names:
        return None
    return optuna.load_study(study_name=cell, storage=storage)


def load_studies(data: ReportData) -> dict[str, Any]:
    """cell → its Optuna study (None when the journal has none of that name); {} without a journal."""
    if data.journal is None:
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return {c.cell: _load_study(data.journal, c.cell) for c in data.cells}


def compute_importance(study) -> tuple[dict[str, float] | None, str]:
    """(importances, note). Importances are None, with the reason, when they cannot be estimated."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"{len(complete)} completed trial(s): too few for a meaningful importance estimate "
                      f"(needs ≥ {MIN_TRIALS_FOR_IMPORTANCE}).")
    varied = sorted({k for t in complete for k in t.params
                     if len({json.dumps(u.params.get(k), default=str) for u in complete}) > 1})
    if not varied:
        return None, "no searched parameter varies across the completed trials."
    target, note = None, ""
    if len(study.directions) > 1:
        target, note = (lambda t: t.values[0]), " Multi-objective study: importance of the first objective."
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            imp = optuna.importance.get_param_importances(study, target=target)
    except Exception as e:  # noqa: BLE001 — the evaluator's own reason goes into the report
        return None, f"importance could not be computed ({type(e).__name__}: {e})."
    msgs = [str(w.message) for w in caught if "importance" in str(w.message).lower()]
    if any("too small" in m for m in msgs):
        return None, f"Optuna: {msgs[0]}"
    if len(complete) < FEW_TRIALS_FOR_IMPORTANCE:
        note += f" Only {len(complete)} completed trials: indicative only."
    return dict(imp), (f"PED-ANOVA (Optuna {optuna.__version__} default evaluator) over {len(complete)} "
                       f"completed trials." + note)


def history_points(study) -> tuple[str, list[tuple[int, float | None, str]]]:
    """(direction, [(trial number, objective value, state name)]) of a study's trials; a trial with
    no final value is shown at its last intermediate value."""
    import optuna

    direction = "maximize" if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    pts = []
    for t in study.trials:
        v = t.values[0] if t.values else (t.intermediate_values[max(t.intermediate_values)]
                                          if t.intermediate_values else None)
        pts.append((t.number, v, t.state.name))
    return direction, pts
