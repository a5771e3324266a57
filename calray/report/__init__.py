"""Sweep reports: tables, plots and the paper's numbers, rendered to Markdown and HTML.

Entry points: `python -m calray.report PATH` and `calray.report.render.write_report(path)`.
Modules, each importing only those listed before it:

- errors        ReportError, the one error the report raises (a path at fault)
- formatting    percentages, numbers, noise labels, file-name slugs
- comparison    the comparison protocol's statistics: compare (paired t + t-CI, Wilcoxon, Holm, wins/losses,
                robust_auc) and write_comparison (comparison.csv/.parquet); the sweep's final stage calls it
- document      the document model (Section, Block) and its Markdown and HTML renderers
- paper_numbers reading paper_numbers.yaml: load_paper_numbers, dataset matching, paper values
- loading       a sweep or run directory read into ReportData (cells, trials, robustness grid)
- cellstats     per-cell numbers: status counts, best trial, seed replicates, clean retrains
- plots         the matplotlib figures (matplotlib imported on first use)
- comparison_section  the Comparison section (first when final.csv exists) and the selection-result labels
- studies       the persisted Optuna studies: importance, optimisation history (optuna on first use)
- sections      SECTIONS (the outline) and the sections overview … contribution dynamics
- ablation      the strategy comparison: per-axis curves and tables, the paper's Fig. 2 / Tables IV–V
- paper         the paper's section: Tables I–III beside our results
- render        build_sections, write_report and the CLI main
"""
