"""Datasets and text sets, generated locally or read from installed packages (no downloads)."""
