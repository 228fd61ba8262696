import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch: no cached graphs (or recompile budget) leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
