"""Triton kernels and their host launchers (imported lazily: they need Triton)."""
