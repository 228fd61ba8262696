"""The native tiled GEMMs (``moe_fuser.kernels.cpu_gemm``) against ``torch.mm`` in float64, in the layouts the CPU
lowering hands them: row slices of one buffer, transposed views (weight gradients, nn.Linear weights), several
GEMMs of different sizes at once, accumulation, and tiles split along rows or columns over two threads."""

import os
import shutil

import pytest
import torch

from moe_fuser.kernels import cpu_gemm

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and not os.environ.get("CXX"),
                                reason="no C++ compiler: the library is not built (the lowering uses torch.mm)")


@pytest.fixture
def two_threads():
    """Two threads, so the GEMMs are cut into tiles, whatever the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _operand(rows: int, cols: int, transposed: bool, pad: int = 0) -> torch.Tensor:
    """A random [rows, cols] matrix: a column slice of a wider buffer (leading dim cols + pad), or the transposed
    view of one."""
    if transposed:
        return torch.randn(cols, rows + pad)[:, :rows].t()
    return torch.randn(rows, cols + pad)[:, :cols]


def test_available_here():
    """torch's x86 builds link MKL and export its sgemm_: where the library builds, the native GEMMs run (the
    lowering's float32 tests then take them, not torch.mm)."""
    assert cpu_gemm.available()


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("together", [True, False])
def test_matches_torch_mm(two_threads, ta, tb, accumulate, together):
    """Shapes long in rows, long in columns, too small to cut and with an empty output; outputs row slices of one
    buffer with a leading dimension wider than them. All in one call (tiles in proportion to each GEMM's flops), or
    each alone (the long ones then cut into several tiles of rows or columns). Unwritten elements would stay NaN."""
    shapes = [(600, 40, 24), (24, 40, 520), (7, 5, 3), (0, 8, 16), (130, 96, 200)]   # (m, k, n)
    items, want = [], []
    buf = torch.full((sum(m for m, _, _ in shapes), 600), float("nan"))
    row = 0
    for i, (m, k, n) in enumerate(shapes):
        a, b = _operand(m, k, ta, pad=i), _operand(k, n, tb, pad=2 * i)
        out = buf[row:row + m, :n]
        row += m
        if accumulate:
            out.copy_(torch.randn(m, n))
        want.append(out.double() + a.double() @ b.double() if accumulate else a.double() @ b.double())
        items.append((a, b, out))
    for group in [items] if together else [[item] for item in items]:
        assert cpu_gemm.mm(group, accumulate=accumulate)
    for (_, _, out), w in zip(items, want):
        assert torch.allclose(out.double(), w, rtol=1e-5, atol=1e-4)
    assert buf[:, 520:].isnan().all()   # nothing written outside the outputs


@pytest.mark.parametrize("why", ["bf16", "strided", "out_transposed", "empty_inner"])
def test_declines_what_it_does_not_run(why):
    """A GEMM it does not run (not float32; no unit stride; a transposed output; k = 0) makes ``mm`` return False
    and leaves every output as it was, so the caller runs them all with torch.mm."""
    a, b = torch.randn(8, 6), torch.randn(6, 5)
    out = torch.full((8, 5), 7.0)
    if why == "bf16":
        a, b, out = a.bfloat16(), b.bfloat16(), out.bfloat16()
    elif why == "strided":
        a = torch.randn(8, 12)[:, ::2]
    elif why == "out_transposed":
        out = torch.full((5, 8), 7.0).t()
    else:
        a, b = torch.randn(8, 0), torch.randn(0, 5)
    fine = (torch.randn(4, 4), torch.randn(4, 4), torch.full((4, 4), 7.0))
    assert not cpu_gemm.mm([fine, (a, b, out)])
    assert (out == 7).all() and (fine[2] == 7).all()


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match=r"\(8, 6\) @ \(5, 5\)"):
        cpu_gemm.mm([(torch.randn(8, 6), torch.randn(5, 5), torch.empty(8, 5))])
