"""The multi-node testbed (benchmarks/ep_testbed/ep_testbed.sh) in a small configuration: 2 namespaces x 2 ranks
on a 1 Gbit/s link run bench_ep.py end to end, and everything is torn down, also when a rank fails.

Skipped, with the script's reason, where it cannot build namespaces (not root, a container without
CAP_SYS_ADMIN, no iproute2): it exits 77 then.
"""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ep_testbed" / "ep_testbed.sh"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ip") is None,
                                reason="the testbed needs Linux network namespaces and iproute2")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _run(args, timeout=240):
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    return proc


def test_testbed_runs_the_benchmark_and_tears_down(tmp_path):
    proc = _run(["--nodes", "2", "--ranks-per-node", "2", "--timeout", "200", "--", sys.executable,
                 str(ROOT / "benchmarks" / "bench_ep.py"), "--tokens", "96", "--d-model", "64", "--configs", "8x2",
                 "--modes", "forward,train", "--variants", "hand-written eager,fused (direct call)", "--iters", "1",
                 "--warmup", "0", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 node(s) x 2, link 1 Gbit/s" in proc.stdout
    assert "netem is not available" in proc.stderr or "netem" not in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "ep_testbed.csv")))
    by = {(r["mode"], r["variant"]): r for r in rows}
    assert len(by) == 4
    for mode in ("forward", "train"):
        seed, fused = by[(mode, "hand-written eager")], by[(mode, "fused (direct call)")]
        assert float(seed["ms"]) > 0 and float(fused["ms"]) > 0
        # the fused exchange sends each token across once per node, the seed once per (token, expert)
        assert 0 < float(fused["inter_node_MB"]) < float(seed["inter_node_MB"])
    assert "eptb" not in _namespaces()


def test_testbed_tears_down_after_a_failing_rank():
    proc = _run(["--timeout", "60", "--", "sh", "-c", 'if [ "$RANK" = 1 ]; then exit 3; fi; sleep 30'])
    assert proc.returncode == 3, proc.stderr
    assert "a rank exited with status 3" in proc.stderr
    assert "eptb" not in _namespaces()
