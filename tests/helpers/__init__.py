"""Layers and models the tests share (importable as ``helpers`` from any test file)."""
