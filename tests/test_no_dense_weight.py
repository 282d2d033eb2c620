"""The promise itself: under torch.compile on the Triton path, a training step never allocates a dense weight.

The profiler records every allocation the step makes (``self_cpu_memory_usage`` per op, kernels' output
buffers and temporaries included). Every dense weight of the model is several times larger than any
activation, so an allocation as large as the smallest weight can only be a weight (or its gradient) built
densely. The kernels run under the Triton interpreter here (on a GPU they run as compiled; the allocations
are the same). The control: the eager reference path, which gathers each view, does make such allocations,
so the check can fail.
"""
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import roastfx

nn = torch.nn


class _Model(nn.Module):
    """A linear pair, an embedding, a conv2d and a grouped conv1d under weight norm per kernel tap
    (Wav2Vec2's positional conv, a row-scaled conv)."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.embed = nn.Embedding(500, 32)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.pos = weight_norm(nn.Conv1d(32, 32, 5, padding=2, groups=2), dim=2)

    def forward(self, x, ids, image, wave):
        h = self.down(torch.nn.functional.gelu(self.up(x)))
        return (h.square().mean() + self.embed(ids).square().mean() + self.conv(image).relu().mean()
                + self.pos(wave).square().mean())


def _dense_weight_bytes(dense: nn.Module) -> int:
    return min(p.numel() * p.element_size() for n, p in dense.named_parameters()
               if p.dim() >= 2 and "original0" not in n)


def _largest_allocation(step) -> tuple[int, str]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return max((e.self_cpu_memory_usage, e.name) for e in prof.events())


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, 64, generator=gen), torch.randint(0, 500, (2, 4), generator=gen),
            torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 32, 8, generator=gen))


def test_compiled_training_step_allocates_no_dense_weight(inputs, monkeypatch):
    torch.manual_seed(0)
    dense = _Model()
    smallest = _dense_weight_bytes(dense)
    activation = max(t.numel() * 4 for t in (dense.up(inputs[0]), dense.conv(inputs[2]), dense.pos(inputs[3]),
                                             dense.embed(inputs[1])))
    assert smallest >= 4 * activation, (smallest, activation)  # the premise of the check
    model = roastfx.compress(dense, "100x", init="random")  # its gradient (memory-sized) stays below too

    monkeypatch.setenv("ROASTFX_KERNELS", "reference")  # control: eager reads gather each dense view
    size, name = _largest_allocation(lambda: model(*inputs).backward())
    assert size >= smallest, (size, name)
    model.zero_grad()

    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager", "fallback": "error"})
    compiled(*inputs).backward()  # compile first: the profiled step is a training step of the compiled model
    model.zero_grad()
    size, name = _largest_allocation(lambda: compiled(*inputs).backward())
    assert size < smallest, f"a {size}-byte allocation by {name} (the smallest dense weight is {smallest} bytes)"
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.isfinite().all() for g in grads)
    assert model.roast_memory.grad.abs().sum() > 0
