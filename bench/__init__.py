"""Benchmarks that print numbers: run ``python -m bench`` (see README, Performance)."""
