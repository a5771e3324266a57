"""Ray Tune + Optuna sweeps: the sweep file, cells, search, manifest, outputs and the runner."""
