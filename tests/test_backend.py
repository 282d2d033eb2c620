"""The `roast` torch.compile backend, registered through the torch_dynamo_backends entry point."""
import copy
import subprocess
import sys
import textwrap

import pytest
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


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_in_compiler_compression_equals_compress_and_leaves_weights(inner, tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = MLP()
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    reference = roastfx.compress(copy.deepcopy(dense), 0.25, seed=4, target="h100")
    report = tmp_path / "plan.json"
    compiled = torch.compile(dense, backend="roast", options={"compression": 0.25, "seed": 4, "target": "h100",
                                                              "inner": inner, "report": str(report)})
    for batch in (5, 9):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            out = compiled(x)
        assert torch.allclose(out, reference(x), atol=1e-5)
        assert not torch.allclose(out, dense(x), atol=1e-3)  # it really runs the compressed weights
    plan = roastfx.Plan.from_json(report.read_text())
    ref_plan = roastfx.roast_state(reference).plan
    assert [s.mapping for s in plan.sites] == [s.mapping for s in ref_plan.sites]
    assert [s.name for s in plan.sites] == ["fc1.weight", "fc2.weight", "out.weight"]
    for n, p in dense.named_parameters():
        assert torch.equal(p, before[n]), n


def test_in_compiler_compression_refuses_training():
    torch._dynamo.reset()
    compiled = torch.compile(MLP(), backend="roast", options={"compression": "10x", "inner": "eager"})
    with pytest.raises(Exception, match=r"cannot compress weights that are being trained.*roastfx.compress"):
        compiled(torch.randn(2, 64))


def test_fallback_policy():
    from helpers import Mixed, mixed_inputs

    torch._dynamo.reset()
    model = roastfx.compress(Mixed(), "4x", example_inputs=mixed_inputs())
    strict = torch.compile(model, backend="roast", options={"fallback": "error", "inner": "eager"})
    with pytest.raises(Exception, match=r"fallback='error': these weight reads have no fused roast op"):
        strict(*mixed_inputs())
    torch._dynamo.reset()
    fine = roastfx.compress(MLP(), "4x")
    out = torch.compile(fine, backend="roast", options={"fallback": "error", "inner": "eager"})(torch.randn(2, 64))
    assert out.shape == (2, 10)
    with pytest.raises(Exception, match=r"fallback='never' is not valid; accepted: materialize, error"):
        torch.compile(fine, backend="roast", options={"fallback": "never"})(torch.randn(2, 64))


@pytest.mark.parametrize("flow", ["compressed", "in-graph"])
def test_dynamic_shapes(flow):
    torch._dynamo.reset()
    torch.manual_seed(0)
    if flow == "compressed":
        model = roastfx.compress(MLP(), "10x", init="random")
        reference, options = model, {"inner": "aot_eager"}
    else:
        model = MLP()
        reference = roastfx.compress(copy.deepcopy(model), "10x")
        options = {"inner": "aot_eager", "compression": "10x"}
    compiled = torch.compile(model, backend="roast", dynamic=True, options=options)
    with torch.no_grad():
        for batch in (2, 3, 17):
            x = torch.randn(batch, 64)
            assert torch.allclose(compiled(x), reference(x), atol=1e-5)


def test_graph_breaks_share_one_memory():
    class Broken(MLP):
        def forward(self, x):
            h = torch.relu(self.fc1(x))
            torch._dynamo.graph_break()
            return self.out(torch.relu(self.fc2(h)))

    torch._dynamo.reset()
    model = roastfx.compress(Broken(), "10x", init="random")
    x = torch.randn(4, 64)
    eager = model(x)
    eager.sum().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    graphs = []

    def count(gm, example_inputs, **kw):
        graphs.append(gm)
        from roastfx.backend import roast_backend

        return roast_backend(gm, example_inputs, options={"inner": "aot_eager"})

    out = torch.compile(model, backend=count)(x)
    out.sum().backward()
    assert len(graphs) == 2
    assert torch.allclose(out, eager, atol=1e-5) and torch.allclose(model.roast_memory.grad, grad, atol=1e-5)
