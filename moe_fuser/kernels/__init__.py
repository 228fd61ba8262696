"""Kernels of the fused MoE op: Triton kernels and launchers (``triton_moe``, imported only by the CUDA
lowering, so nothing here needs triton at import), their block configurations (``tuning`` + ``configs/``), and
the CPU lowering's native library (``native``: C++ built on first use, with an ATen fallback): its silu passes,
SwiGLU or plain (``cpu_glu``), and its tiled float32 expert GEMMs (``cpu_gemm``)."""
