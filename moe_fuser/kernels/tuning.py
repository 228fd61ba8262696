"""Block configurations of the Triton MoE kernels: tuned data files, a default, and the lookup.

Tuned configurations are JSON files in ``moe_fuser/kernels/configs/`` (package data), one per expert shape and
device, named by ``config_name(E, N, K, dtype, device)`` with N = F (expert hidden dim) and K = D (model dim):
``E=8,N=14336,K=4096,dtype=bfloat16,device=NVIDIA_H200.json``. ``default.json`` serves every other shape. A file
maps token counts T to one configuration each; ``block_config`` takes the entry with the nearest T (in log
scale), and fills any kernel the entry lacks from the default's entry. One configuration:

    {"BLOCK_M": 64,                       rows per block: shared by all kernels through the alignment
     "gate_up": {...}, "down": {...},     forward GEMMs
     "down_bwd": {...}, "dx": {...},      backward GEMMs over the sorted rows
     "wgrad": {"BLOCK_M": ..., ...}}      weight-grad GEMMs (their own M tile: a weight dimension)

with every kernel's ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``, ``num_warps``, ``num_stages``. Keys starting with ``_``
are comments. ``benchmarks/gpu_check.py --tune`` writes such files. This module does not import triton.
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from typing import Optional

import torch

__all__ = ["KERNELS", "block_config", "config_name", "device_name", "validate_config"]

KERNELS = ("gate_up", "down", "down_bwd", "dx", "wgrad")
_TILE_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def device_name(device: torch.device) -> str:
    """The device part of a config name: the CUDA device name with spaces as underscores; 'interpreter' on CPU."""
    if device.type != "cuda":
        return "interpreter"
    return torch.cuda.get_device_name(device).replace(" ", "_")


def config_name(E: int, N: int, K: int, dtype: torch.dtype, device: str) -> str:
    return f"E={E},N={N},K={K},dtype={str(dtype).removeprefix('torch.')},device={device}.json"


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Optional[dict]:
    path = resources.files("moe_fuser.kernels").joinpath("configs", name)
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    return {int(t): cfg for t, cfg in table.items() if not t.startswith("_")}


def _nearest(table: dict, T: int) -> dict:
    return table[min(table, key=lambda t: (abs(math.log2(max(t, 1)) - math.log2(max(T, 1))), t))]


def _is_pow2(v) -> bool:
    return isinstance(v, int) and v >= 16 and v & (v - 1) == 0


def validate_config(cfg: dict) -> dict:
    """Raise ValueError naming the bad entry; return ``cfg``."""
    if not _is_pow2(cfg.get("BLOCK_M")):
        raise ValueError(f"BLOCK_M must be a power of two >= 16 (tl.dot's minimum); got {cfg.get('BLOCK_M')!r}")
    for k in KERNELS:
        sub = cfg.get(k)
        if not isinstance(sub, dict):
            raise ValueError(f"the config lacks kernel {k!r}; give {_TILE_KEYS} for each of {KERNELS}")
        for key in ("BLOCK_N", "BLOCK_K") + (("BLOCK_M",) if k == "wgrad" else ()):
            if not _is_pow2(sub.get(key)):
                raise ValueError(f"{k}.{key} must be a power of two >= 16; got {sub.get(key)!r}")
        for key in ("GROUP_M", "num_warps", "num_stages"):
            if not isinstance(sub.get(key), int) or sub[key] < 1:
                raise ValueError(f"{k}.{key} must be a positive int; got {sub.get(key)!r}")
    return cfg


def block_config(E: int, F: int, D: int, dtype: torch.dtype, device: torch.device, T: int,
                 override: Optional[dict] = None) -> dict:
    """The configuration for T tokens: the tuned file's nearest entry, completed from the default; ``override``
    (a full or partial configuration) wins over both. Do not mutate the result: it is cached."""
    if override:
        return validate_config({**_data_config(E, F, D, dtype, device_name(device), T), **override})
    return _data_config(E, F, D, dtype, device_name(device), T)


@functools.lru_cache(maxsize=1024)
def _data_config(E: int, F: int, D: int, dtype: torch.dtype, device: str, T: int) -> dict:
    default = _nearest(_load("default.json"), T)
    tuned = _load(config_name(E, F, D, dtype, device))
    cfg = {**default, **(_nearest(tuned, T) if tuned else {})}
    return validate_config({k: v for k, v in cfg.items() if not k.startswith("_")})
