import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores for torch's intra-op threads, so that the
    workers do not oversubscribe the machine (on 2 cores, 2 workers of 2 threads each ran the triton interpreter
    test in 108 s, of 1 thread each in 57 s)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
