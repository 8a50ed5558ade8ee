"""Triton kernels of vlfast, installed as vlfast.kernels."""
