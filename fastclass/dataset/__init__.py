"""Datasets: train/valid splits, sealed snapshots and their exports."""
