import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch: dynamo's caches (and its recompile limit, which would silently fall
    back to eager after 8 compiles of one forward) do not leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
