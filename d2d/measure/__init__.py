"""Measurements: quality, FLOPs, sparsity, sensitivity, time and memory of a model."""
