"""The CPU lowering's native library: ``cpu_glu.cpp`` (silu passes) and ``cpu_gemm.cpp`` (tiled expert GEMMs),
built together into one shared library and loaded through ctypes (no torch headers: the build takes about a second).

Built on first use with the host's g++ (``$CXX`` overrides it) into ``$MOE_FUSER_CACHE_DIR`` (default
``~/.cache/moe_fuser``), keyed by the sources, the compiler, torch's version and the CPU's flags (the build is
``-march=native``). It links the libgomp that torch ships, so its OpenMP loops run on torch's own thread pool.
Where there is no compiler, the build fails, or ``MOE_FUSER_NATIVE_KERNELS=0``, ``library()`` is None (the reason
logged once on the ``moe_fuser`` logger) and the lowering keeps its plain ATen path, which computes the same values.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["library"]

log = logging.getLogger("moe_fuser")

_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_glu.cpp", "cpu_gemm.cpp")]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(cache_dir: Path) -> Path:
    """The shared library's path, compiled there unless a build of the same inputs is already cached."""
    cxx = shlex.split(os.environ.get("CXX", "")) or [shutil.which("g++")]   # $CXX may carry a wrapper (ccache)
    if not cxx[0]:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c++17"]
    if (torch_lib / "libgomp.so.1").exists():   # torch's own OpenMP runtime: share its thread pool
        flags += ["-fopenmp", f"-L{torch_lib}", "-l:libgomp.so.1", f"-Wl,-rpath,{torch_lib}"]
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([*(src.read_text() for src in _SOURCES), " ".join(cxx), version, " ".join(flags),
                                    torch.__version__, _cpu_flags()]).encode()).hexdigest()[:16]
    lib = cache_dir / f"moe_fuser_cpu-{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run([*cxx, *flags, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cxx)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)   # atomic: concurrent builders (pytest-xdist workers) each publish a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The loaded library (built on the first call), or None where it cannot be (see the module docstring)."""
    if os.environ.get("MOE_FUSER_NATIVE_KERNELS", "1") == "0":
        log.info("moe_fuser: native CPU kernels switched off (MOE_FUSER_NATIVE_KERNELS=0)")
        return None
    cache = Path(os.environ.get("MOE_FUSER_CACHE_DIR") or Path.home() / ".cache" / "moe_fuser")
    try:
        return ctypes.CDLL(str(_build(cache)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("moe_fuser: native CPU kernels unavailable, using plain ATen (%s)", e)
        return None
