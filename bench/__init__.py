"""Benchmarks: plain scripts, run as ``python bench/NAME.py`` (see README.md)."""
