"""Triton kernels of fptt_fast (installed as fptt_fast.kernels)."""
