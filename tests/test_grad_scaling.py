"""compress(..., grad_scaling="site"): each site's weight gradient is divided by its RMS before it
reaches the shared memory. The expected memory gradient is computed here from docs/mapping.md with
Python ints, independently of roastfx's hashing and of its scaling code."""
import math

import pytest
import torch
from torch import nn

import roastfx
from helpers import MLP, P
from roastfx.plan import Plan


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids).mean(1))))


def index_and_sign(m: dict, k: int, n: int):
    span = m["tile_rows"] * m["tile_cols"]
    i, j = k // m["tile_rows"], n // m["tile_cols"]
    h = (m["a_row"] * i + m["a_col"] * j + m["b"]) % P
    start = m["window_start"] + (h % (m["window_size"] - span + 1)) // m["alignment"] * m["alignment"]
    g = (m["c_row"] * k + m["c_col"] * n + m["d"]) % P
    return start + (k % m["tile_rows"]) * m["tile_cols"] + n % m["tile_cols"], (-1.0 if (g >> 16) & 1 else 1.0)


def expected_memory_grad(plan, upstream: dict, normalize: bool) -> list[float]:
    """sum over sites and elements of scale * sign * dL/dW (divided by the site's RMS when normalizing)."""
    want = [0.0] * plan.memory_size
    for site in plan.sites:
        m = site.mapping.to_dict()
        up = upstream[site.name].double()
        up = up.reshape(up.shape[0], -1).t() if site.transposed else up.reshape(up.shape[0], -1)
        values = [float(v) for v in up.reshape(-1)]
        rms = math.sqrt(sum(v * v for v in values) / len(values)) if normalize else 1.0
        for k in range(m["rows"]):
            for n in range(m["cols"]):
                index, sign = index_and_sign(m, k, n)
                want[index] += site.scale * sign * float(up[k, n]) / rms
    return want


def weights_of(model):
    return {"emb.weight": model.emb.weight, "fc.weight": model.fc.weight, "head.weight": model.head.weight}


@pytest.mark.parametrize("grad_scaling", ["none", "site"])
def test_memory_gradient_matches_the_formula(grad_scaling):
    torch.manual_seed(0)
    model = roastfx.compress(Net(), "4x", seed=2, init="random", grad_scaling=grad_scaling)
    plan = roastfx.roast_state(model).plan
    assert plan.grad_scaling == grad_scaling
    gen = torch.Generator().manual_seed(3)
    # sites whose gradients differ by orders of magnitude, as a head and an encoder do
    upstream = {name: torch.randn(w.shape, generator=gen) * mag
                for (name, w), mag in zip(weights_of(model).items(), (1e-4, 1.0, 300.0))}
    sum((w * upstream[name]).sum() for name, w in weights_of(model).items()).backward()
    want = torch.tensor(expected_memory_grad(plan, upstream, grad_scaling == "site"), dtype=torch.float64)
    torch.testing.assert_close(model.roast_memory.grad.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_site_scaling_changes_only_the_gradient_and_keeps_zero_gradients():
    torch.manual_seed(1)
    a = roastfx.compress(MLP(), "10x", seed=4, init="random")
    torch.manual_seed(1)
    b = roastfx.compress(MLP(), "10x", seed=4, init="random", grad_scaling="site")
    x = torch.randn(5, 64)
    assert torch.equal(a(x), b(x))
    # a site that gets no gradient stays at zero (no 0/0)
    b.out.weight.mul(0).sum().backward()
    assert torch.equal(b.roast_memory.grad, torch.zeros_like(b.roast_memory))
    # tiny and huge gradients neither underflow nor overflow: each site hands the memory unit RMS
    b.roast_memory.grad = None
    (b.fc1.weight.sum() * 1e-30 + b.fc2.weight.sum() * 1e30).backward()
    g = b.roast_memory.grad
    assert torch.isfinite(g).all() and 0 < float(g.abs().max()) < 1e3


def test_grad_scaling_round_trips_through_checkpoints(tmp_path):
    model = roastfx.compress(MLP(), "10x", seed=5, grad_scaling="site")
    path = tmp_path / "m.safetensors"
    roastfx.save(model, path)
    assert roastfx.read_plan(path).grad_scaling == "site"
    loaded = roastfx.load(MLP, path)
    assert roastfx.roast_state(loaded).plan.grad_scaling == "site"
    # load_state_dict into a model compressed without it: the checkpoint's plan (and its scaling) wins
    other = roastfx.compress(MLP(), "10x", seed=5)
    other.load_state_dict(model.state_dict())
    assert roastfx.roast_state(other).plan.grad_scaling == "site"


def test_plans_written_before_the_option_load_with_plain_gradients():
    plan = roastfx.roast_state(roastfx.compress(MLP(), "10x", seed=6, grad_scaling="site")).plan
    old = plan.to_dict()
    del old["grad_scaling"]
    assert Plan.from_dict(old).grad_scaling == "none"
    assert "grad_scaling=site" in plan.summary()


@pytest.mark.parametrize("bad", ["Site", "slot", None, 1.0])
def test_bad_grad_scaling_is_a_clear_error_and_leaves_the_model_alone(bad):
    model = MLP()
    with pytest.raises(ValueError, match="grad_scaling=.*accepted: 'none', 'site'"):
        roastfx.compress(model, "10x", grad_scaling=bad)
    assert roastfx.roast_state(model) is None and isinstance(model.fc1.weight, nn.Parameter)
    plan = roastfx.roast_state(roastfx.compress(MLP(), "10x")).plan.to_dict()
    plan["grad_scaling"] = "per-slot"
    with pytest.raises(ValueError, match="grad_scaling='per-slot'"):
        Plan.from_dict(plan)


@pytest.mark.parametrize("tokens,vocab,dim", [(1, 5, 3), (37, 11, 7), (200, 3, 4), (0, 4, 2)])
def test_embedding_table_rms_from_looked_up_rows_matches_the_dense_table(tokens, vocab, dim):
    """Repeated ids sum into one table row; rows never looked up are zeros (float64 reference)."""
    from roastfx.codegen.ops import table_grad_rms

    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    rows = torch.randn(tokens, dim, generator=gen, dtype=torch.float64)
    table = torch.zeros(vocab, dim, dtype=torch.float64).index_add_(0, ids, rows)
    got = table_grad_rms(rows.float().reshape(tokens, 1, dim), ids.reshape(tokens, 1), [vocab, dim])
    torch.testing.assert_close(got.double(), table.square().mean().sqrt(), rtol=1e-6, atol=0)
