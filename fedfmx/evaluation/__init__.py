"""Benchmarks' grid, class-incremental metrics and plots."""
