"""Helpers for tests, benchmarks and the demo: synthetic video with ground truth, tiny
offline models, and real throw-away servers."""
