"""Kernels of the fused MoE op: Triton kernels and launchers (``triton_moe``, imported only by the CUDA
lowering, so nothing here needs triton at import), and their block configurations (``tuning`` + ``configs/``)."""
