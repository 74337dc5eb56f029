"""Inference: packed FP4 experts, decoding."""
