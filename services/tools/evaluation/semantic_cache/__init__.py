"""Offline evaluation, calibration and benchmarks of the semantic cache (make eval-cache)."""
