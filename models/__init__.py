"""Deterministic builders of the sample models (seeded weights; never hand-edited binaries)."""
