"""Batch normalization (Ioffe & Szegedy, 2015): reference, PyTorch modules and kernels."""
