"""Sweep reports: one self-contained ``report.html`` (plots embedded as base64 PNG) and a
``report.md`` beside it (plots in ``report_files/``), rendered from a finished sweep directory or
a single run directory. Every number comes from the files in that directory (calray.report.loading
lists them); see docs/REPORTS.md for what each section shows and where its numbers come from. The
paper's numbers come from ``calray/report/paper_numbers.yaml`` and are always labelled as the paper's.

`python -m calray.report PATH`; `write_report(path) -> (html_path, md_path)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from calray.errors import run_cli
from calray.io import atomic_write_text
from calray.report.ablation import section_strategies
from calray.report.comparison_section import has_comparison, section_comparison
from calray.report.document import Block, Section, render_html, render_md  # noqa: F401 — Block: re-exported
from calray.report.loading import ReportData, load_directory
from calray.report.paper import section_paper
from calray.report.sections import (section_best_configs, section_cells, section_dynamics, section_history,
                                    section_importance, section_overview, section_robustness)
from calray.report.studies import load_studies


def build_sections(data: ReportData) -> list[Section]:
    studies = load_studies(data) if data.kind == "sweep" else {}
    first = [section_comparison(data)] if has_comparison(data) else []
    return first + [section_overview(data), section_cells(data), section_best_configs(data),
            section_importance(data, studies), section_history(data, studies), section_robustness(data),
            section_dynamics(data), section_strategies(data), section_paper(data)]


def write_report(sweep_dir: Path) -> tuple[Path, Path]:
    """Render report.html (self-contained) and report.md (+ report_files/) in `sweep_dir`."""
    root = Path(sweep_dir)
    data = load_directory(root)
    sections = build_sections(data)
    title = f"calray {data.kind} report: {data.name}"
    subtitle = f"Rendered {time.strftime('%Y-%m-%d %H:%M:%S')} from {root.resolve()}."
    files_dir = root / "report_files"
    if files_dir.is_dir():
        for old in files_dir.glob("*.png"):
            old.unlink()
    html_path, md_path = root / "report.html", root / "report.md"
    atomic_write_text(md_path, render_md(title, sections, subtitle, files_dir))
    atomic_write_text(html_path, render_html(title, sections, subtitle))
    return html_path, md_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calray.report",
                                description="Render report.html and report.md for a sweep or run directory.")
    p.add_argument("path", help="sweep directory (cells.json, trials.parquet, ...) or run directory")
    args = p.parse_args(argv)

    def body() -> int:
        html_path, md_path = write_report(Path(args.path))
        print(f"wrote {html_path}\nwrote {md_path}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
