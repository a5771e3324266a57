"""The paper's reported numbers: `load_paper_numbers()` reads ``paper_numbers.yaml`` beside this module
(checked for shape), `canonical_dataset` maps a dataset name or label to the paper's, and
`paper_value`/`paper_str` turn a printed number (percent or fraction) into ours."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from calray.report.errors import ReportError
from calray.report.formatting import pct

PAPER_FILE = Path(__file__).with_name("paper_numbers.yaml")


@lru_cache(maxsize=1)
def load_paper_numbers() -> dict:
    """The paper's reported numbers (calray/paper_numbers.yaml), checked for shape."""
    try:
        data = yaml.safe_load(PAPER_FILE.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ReportError(f"{PAPER_FILE}: cannot read the paper's numbers ({e})") from None
    for key, t in data.get("tables", {}).items():
        ncols = len(t.get("columns", []))
        rows = t.get("rows") or [r for d in (t.get("datasets") or {}).values() for r in d["rows"]]
        for r in rows:
            if "values" in r and len(r["values"]) != ncols:
                raise ReportError(f"{PAPER_FILE}: tables.{key}: row {r} has {len(r['values'])} values "
                                  f"for {ncols} columns")
    return data


def canonical_dataset(name: str | None) -> str | None:
    if not name:
        return None
    key = str(name).strip().lower()
    for canon, aliases in load_paper_numbers()["dataset_aliases"].items():
        if key == canon or key in aliases:
            return canon
    return None


def paper_value(table: dict, value) -> float:
    """A paper number as a fraction (tables are in percent or fractions, as printed)."""
    return float(value) / 100.0 if table["unit"] == "percent" else float(value)


def paper_str(table: dict, value) -> str:
    return pct(paper_value(table, value))
