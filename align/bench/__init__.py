"""Benchmarks: each prints ratios measured in one run (never asserted in tests)."""
