"""Benchmarks of the text-to-image stack: `python -m bench` (see bench/README.md)."""
