"""calray: Contribution-Guided Asymmetric Learning (CAL) as a research instrument."""

__version__ = "0.1.0"
