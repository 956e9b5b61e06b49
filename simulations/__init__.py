"""Synthetic federations, experiment configs, baselines and benchmarks."""
