"""Concentration instruments (entropy, spectral gap, log-normality), sweeps and calibration."""
