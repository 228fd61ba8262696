"""A stand-in ``torchair`` (Ascend's torch.compile backend) for the tests: the two names moe_fuser uses.

``get_npu_backend(compiler_config=...)`` returns a dynamo backend. The real one lowers the FX graph to a GE graph
("max-autotune") or captures an aclgraph ("reduce-overhead"); this one records the config it was built with
(``BUILT``) and the graphs it compiled (``COMPILED``), then compiles with ``aot_eager`` so the graph still runs,
forward and backward. It proves moe_fuser's plumbing (``options={"inner": "npu"}``), not torchair itself.
"""

from __future__ import annotations

import torch

BUILT: list["CompilerConfig"] = []
COMPILED: list[torch.fx.GraphModule] = []


class _Experimental:
    def __init__(self):
        self.keep_inference_input_mutations = False


class CompilerConfig:
    def __init__(self):
        self.mode = "max-autotune"
        self.experimental_config = _Experimental()


def get_npu_backend(*, compiler_config: CompilerConfig | None = None):
    config = compiler_config if compiler_config is not None else CompilerConfig()
    BUILT.append(config)
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def npu_backend(gm: torch.fx.GraphModule, example_inputs):
        COMPILED.append(gm)
        return aot_eager(gm, example_inputs)

    return npu_backend
