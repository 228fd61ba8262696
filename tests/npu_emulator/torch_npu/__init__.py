"""A stand-in ``torch_npu`` for the tests: the Ascend MoE ops moe_fuser calls, in plain PyTorch, as documented.

No Ascend device or CANN toolkit exists where moe_fuser is tested, and the real ``torch_npu`` must never be
installed into the test environment (it breaks ``import torch``). This package lets the NPU lowering run on CPU
tensors against the ops' *documented* behaviour: the torch-npu 2.13.0 wheel's ``_op_plugin_docs.py`` and the
Ascend/op-plugin docs (signatures, shapes, dtypes, constraints, reference code). It is loaded only by the tests
(``tests/npu/conftest.py`` prepends ``tests/npu_emulator`` to ``sys.path`` and removes it afterwards).

How it keeps the lowering honest:
- every documented constraint on an argument the lowering can get wrong is checked and raises ``RuntimeError``
  (as the real ops do), so a test passes only if the lowering stays inside the documented contract;
- outputs the docs call undefined (rows past the valid ones, padding) are filled with NaN or a poison index, so a
  lowering that reads them fails loudly instead of passing by luck;
- where the docs leave an order open (rows within one expert after MC2 dispatch), the emulator shuffles it.

Emulated (everything moe_fuser calls): ``npu_moe_gating_top_k_softmax``, ``npu_moe_gating_top_k`` and its
``npu_moe_gating_top_k_backward``, ``npu_moe_init_routing_v2`` (dropless, counts or key-value expert tokens,
gather or scatter row index), ``npu_grouped_matmul`` (M-grouped with one 3D or a list of 2D weights; ungrouped
lists), ``npu_swiglu``, ``npu_moe_finalize_routing`` (dropless modes 0 = column-major and 2 = row-major index),
``npu_moe_re_routing``, ``npu_moe_distribute_dispatch_v2`` / ``npu_moe_distribute_combine_v2`` (over
``torch.distributed``, with the Atlas A3 constraints), and ``torch_npu.npu.get_device_name``. Quantisation, drop/pad
layouts and shared-expert ranks are not emulated and raise ``NotImplementedError`` naming the argument.

``EMULATOR = True`` marks this package; ``moe_fuser.lowering.npu`` accepts CPU tensors only when it sees this
marker *and* ``MOE_FUSER_NPU_EMULATOR=1`` is set.
"""

from . import npu
from ._compute import npu_grouped_matmul, npu_swiglu
from ._distributed import comm_name, npu_moe_distribute_combine_v2, npu_moe_distribute_dispatch_v2
from ._routing import (npu_moe_finalize_routing, npu_moe_gating_top_k, npu_moe_gating_top_k_backward,
                       npu_moe_gating_top_k_softmax, npu_moe_init_routing_v2, npu_moe_re_routing)

EMULATOR = True
__version__ = "2.13.0+moe_fuser.emulator"

__all__ = [
    "EMULATOR",
    "comm_name",
    "npu",
    "npu_grouped_matmul",
    "npu_moe_distribute_combine_v2",
    "npu_moe_distribute_dispatch_v2",
    "npu_moe_finalize_routing",
    "npu_moe_gating_top_k",
    "npu_moe_gating_top_k_backward",
    "npu_moe_gating_top_k_softmax",
    "npu_moe_init_routing_v2",
    "npu_moe_re_routing",
    "npu_swiglu",
]
