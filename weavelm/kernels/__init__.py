"""Numba-CUDA kernels, their PTX primitives, launchers and torch references.

* `common`: what every kernel shares (dtype table, block limits, launch plans, the 16-byte codec).
* `ptx`: the PTX primitives (the only inline PTX); `launcher`: compile and launch a kernel.
* `rmsnorm`: RMSNorm and fused residual-add + RMSNorm on one GPU.
* `allreduce_norm`: the cross-GPU kernels' host side (references, plans, launchers); their
  kernels in `allreduce_norm_fused` and `allreduce_norm_plain`, built on `allreduce_norm_transport`
  (p2p or multimem) and `allreduce_norm_sync` (barriers) over `allreduce_norm_layout`.

Public launchers check their inputs; each kernel has a torch reference with the same signature,
and CPU tensors always go to the reference.
"""
