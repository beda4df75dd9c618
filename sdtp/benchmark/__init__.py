"""Efficiency measurement: timing, memory probes, provenance and reports for ``sdtp-bench``."""
