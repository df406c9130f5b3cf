"""ladc: Label-Aware Distribution Calibration (AAAI 2022) for long-tailed classification."""

__version__ = "0.1.0"
