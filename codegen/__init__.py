"""Kernels for roast ops: the ROAST mapping, its PyTorch reference path, and Triton kernels."""
