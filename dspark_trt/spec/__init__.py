"""Speculative core: pure functions with no I/O (sampling, verification, scheduling, calibration, metrics)."""
