"""The `roast` torch.compile backend, registered through the torch_dynamo_backends entry point."""
import subprocess
import sys
import textwrap

import torch

import roastfx
from helpers import MLP


def test_backend_registered_without_importing_roastfx():
    code = textwrap.dedent("""
        import sys, torch
        from torch._dynamo.backends.registry import list_backends, lookup_backend
        assert "roastfx" not in sys.modules
        fn = lookup_backend("roast")
        print(fn.__module__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("roastfx.backend")


def test_compiled_compressed_model_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = roastfx.compress(MLP(), "20x", init="random")
    x = torch.randn(6, 64)
    eager = model(x)
    eager.sum().backward()
    g_eager = model.roast_memory.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="roast", options={"target": "h100", "inner": "aot_eager"})
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(model.roast_memory.grad, g_eager, atol=1e-5)
