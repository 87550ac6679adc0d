"""Benchmarks runnable from the CLI (``kvplug bench ...``) and from ``bench/``."""
