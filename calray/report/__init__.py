"""Sweep reports: tables, plots and the paper's numbers, rendered to Markdown and HTML."""
