"""Start the ranks of a multi-process test as subprocesses on tcp://127.0.0.1 and collect their RESULT lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("_ep_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, world: int, timeout: float = 150.0, worker: Path = WORKER,
              expect_dead: tuple[int, ...] = ()) -> list[dict]:
    """Run ``worker SCENARIO RANK WORLD PORT`` for every rank; return each rank's RESULT (None for a rank in
    ``expect_dead``). Fails with the ranks' output on an error, a missing result or a timeout."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, str(worker), scenario, str(r), str(world), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"scenario {scenario!r} with {world} ranks did not finish within {timeout} s")
    results = []
    for r, (p, out) in enumerate(zip(procs, outputs)):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if r in expect_dead:
            results.append(None)
            continue
        if not lines:
            pytest.fail(f"rank {r} of scenario {scenario!r} gave no result (exit {p.returncode}):\n{out[-4000:]}")
        res = json.loads(lines[-1][len("RESULT "):])
        if "error" in res and isinstance(res["error"], str) and res["error"].startswith("Traceback"):
            pytest.fail(f"rank {r} of scenario {scenario!r} failed:\n{res['error']}\n{out[-3000:]}")
        results.append(res)
    return results
