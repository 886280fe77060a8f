"""Benchmarks: ``python -m benchmarks.codecs`` measures codec throughput and bits per entry."""
