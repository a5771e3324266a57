"""The robustness grid: noise kind × ε × attack mode on trained runs (test mode) or retrains (train+test)."""
