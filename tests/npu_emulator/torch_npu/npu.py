"""``torch_npu.npu``: the one device query moe_fuser makes (which Ascend product, for the MC2 constraints).

``DEVICE_NAME`` is what ``get_device_name`` reports; tests set it to an Atlas A2 name (``"Ascend910B3"``) to
exercise the A2 constraint set. The default is an Atlas A3 part, whose MC2 ops accept 2-rank groups.
"""

DEVICE_NAME = "Ascend910_9392"


def get_device_name(device=None) -> str:
    return DEVICE_NAME


def is_available() -> bool:
    return False
