"""Kernel tests run on CUDA when it is there and ROASTFX_TEST_CUDA=1, else in the Triton interpreter on CPU."""
import os

import pytest
import torch

# read when a kernel is decorated: must precede every import of codegen.triton_*
if os.environ.get("ROASTFX_TEST_CUDA") and not torch.cuda.is_available():
    # asked for the GPU: passing in the interpreter instead would read as a GPU pass
    raise pytest.UsageError("ROASTFX_TEST_CUDA=1 but torch.cuda.is_available() is False: no CUDA device to test "
                            "the kernels on (unset ROASTFX_TEST_CUDA to run them in the Triton interpreter)")
if not os.environ.get("ROASTFX_TEST_CUDA"):
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_report_header(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "roastfx kernels: Triton interpreter on CPU"
    return f"roastfx kernels: CUDA, {torch.cuda.get_device_name()}"


@pytest.fixture
def device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def deterministic_mode():
    """Turns torch's deterministic algorithms on or off for one test, then restores them."""
    before = torch.are_deterministic_algorithms_enabled()
    yield lambda on: torch.use_deterministic_algorithms(on)
    torch.use_deterministic_algorithms(before)
