"""Load the torch_npu emulator (tests/npu_emulator) for the tests in this directory only.

Per test module: prepend the emulator to ``sys.path``, set ``MOE_FUSER_NPU_EMULATOR=1`` (so the npu lowering
accepts CPU tensors), import it; afterwards remove the modules, the path entry and the variable, so no other
test ever sees a ``torch_npu``.
"""

import os
import sys

import pytest

EMULATOR_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "npu_emulator")


def _drop_modules():
    for name in [m for m in sys.modules if m.split(".")[0] in ("torch_npu", "torchair")]:
        del sys.modules[name]


@pytest.fixture(scope="module", autouse=True)
def npu_emulator():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_FUSER_NPU_EMULATOR", "1")
        mp.syspath_prepend(EMULATOR_DIR)
        _drop_modules()
        import torch_npu
        assert torch_npu.EMULATOR is True
        yield torch_npu
        _drop_modules()
