"""Triton kernels, imported lazily (only when a CUDA tensor asks for them)."""
