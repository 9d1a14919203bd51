"""Batching, scheduling and model execution (generation and classification engines)."""
