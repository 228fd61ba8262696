"""Kernels of the fused MoE op: Triton kernels and launchers (``triton_moe``, imported only by the CUDA
lowering, so nothing here needs triton at import), their block configurations (``tuning`` + ``configs/``), and
the CPU lowering's native silu passes, SwiGLU or plain (``cpu_glu``: C++ built on first use, with an ATen
fallback)."""
