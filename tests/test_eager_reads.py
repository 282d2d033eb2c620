"""Within one eager forward of the root model, a compressed weight that the previous forward read more than once
(an RNN cell called per step, a loop over experts, a weight used twice) is read from the memory once and shared:
outputs and memory gradients equal reading it at every use, and the forward does fewer reads."""
import pytest
import torch
from torch import nn

import roastfx
from roastfx import state as roast_state_module
from roastfx.codegen import ops


class Decoder(nn.Module):
    """An LSTM cell stepped in Python, a stacked expert weight indexed per expert, and a head used twice."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(6, 10)
        self.experts = nn.Parameter(torch.randn(3, 10, 10) / 3)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        h = c = torch.zeros(x.shape[0], 10, dtype=x.dtype)
        outs = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            expert = t % 3
            outs.append(self.head(h @ self.experts[expert].t()) + self.head(h).tanh())
        return torch.stack(outs, 1)


def _model(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    return roastfx.compress(Decoder().double(), "3x", example_inputs=(x,)), x


@pytest.fixture
def count_reads(monkeypatch):
    calls = []
    apply = ops.EagerMaterialize.apply

    def counted(*args):
        calls.append(args[1])
        return apply(*args)

    monkeypatch.setattr(ops.EagerMaterialize, "apply", counted)
    return calls


def test_repeated_reads_are_shared_within_a_forward_with_equal_outputs_and_gradients(count_reads, monkeypatch):
    model, x = _model()
    sites = {s.name for s in roastfx.roast_state(model).plan.sites}
    assert {"cell.weight_ih", "cell.weight_hh", "experts", "head.weight"} <= sites
    model(x)
    first = len(count_reads)
    assert first == 5 * 5  # each of 5 steps: the cell's two weights, one expert read, the head twice
    assert roastfx.roast_state(model).repeated == frozenset(sites)
    count_reads.clear()
    out = model(x)
    assert len(count_reads) == len(sites)  # one read per site
    out.square().sum().backward()
    shared_grad = model.roast_memory.grad.clone()

    # the same forward with every use reading the memory again
    monkeypatch.setattr(roast_state_module.RoastState, "keep_read", lambda self, site, weight: None)
    model.roast_memory.grad = None
    count_reads.clear()
    again = model(x)
    assert len(count_reads) == first
    again.square().sum().backward()
    torch.testing.assert_close(out, again, rtol=0, atol=0)
    torch.testing.assert_close(model.roast_memory.grad, shared_grad, rtol=1e-12, atol=1e-15)


def test_gradient_accumulation_and_optimizer_steps_read_the_memory_afresh(count_reads):
    """Two forwards and backwards before a step (a weight shared within one forward is never reused by the
    next, whose backward would then run through a freed graph), then a step: the next forward reads the new
    memory."""
    model, x = _model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x)  # learns which sites repeat
    for _ in range(2):
        model(x).sum().backward()
    grad_two = model.roast_memory.grad.clone()
    model.roast_memory.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(grad_two, 2 * model.roast_memory.grad)
    before = model(x).detach()
    opt.step()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        assert torch.equal(model(x), after)


def test_a_forward_that_raises_leaves_no_shared_reads_behind(count_reads):
    model, x = _model(2)
    model(x)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 7, dtype=torch.float64))  # wrong feature size: the cell raises
    count_reads.clear()
    model.head.weight  # outside a forward: a fresh read
    model.head.weight
    assert len(count_reads) == 2
    count_reads.clear()
    model(x)
    assert len(count_reads) == 4
