"""Curating images: the lifecycle that owns their state, verify, dedup, review, labels, store checks."""
