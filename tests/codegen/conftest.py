"""Kernel tests run on CUDA when it is there and ROASTFX_TEST_CUDA=1, else in the Triton interpreter on CPU."""
import os

import pytest
import torch

# read when a kernel is decorated: must precede every import of codegen.triton_*
if not (os.environ.get("ROASTFX_TEST_CUDA") and torch.cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def deterministic_mode():
    """Turns torch's deterministic algorithms on or off for one test, then restores them."""
    before = torch.are_deterministic_algorithms_enabled()
    yield lambda on: torch.use_deterministic_algorithms(on)
    torch.use_deterministic_algorithms(before)
