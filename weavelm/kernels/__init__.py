"""Numba-CUDA kernels, their PTX primitives, launchers and torch references.

Each kernel module holds a private `_kernel`, a public launcher that checks its inputs, and a torch
reference with the same signature; CPU tensors always go to the reference.
"""
