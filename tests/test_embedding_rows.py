"""Eager lookups of compressed nn.Embedding / nn.EmbeddingBag read only the looked-up rows from the memory:
the same outputs and memory gradients as torch's own functional over the whole weight computed from the
memory (the independent reference here), at odd shapes, with the options that keep them on that path and
those that send them back to the whole weight."""
import pytest
import torch
from torch import nn

import roastfx
from roastfx.codegen import runs


def whole_weight_reference(model, attr="weight"):
    """A leaf copy of the memory and the module's dense weight computed from it by the reference path."""
    from roastfx.codegen.reference import materialize, view_to_weight

    state = roastfx.roast_state(model)
    site = state.plan.sites[0]
    memory = model.roast_memory.detach().clone().requires_grad_()
    weight = view_to_weight(materialize(memory, site.mapping, site.scale), site.shape, site.transposed)
    return memory, weight


def count_view_reads(monkeypatch):
    reads = []
    original = runs.gather_view
    monkeypatch.setattr(runs, "gather_view", lambda *a: reads.append(1) or original(*a))
    from roastfx.codegen import ops
    monkeypatch.setattr(ops, "gather_view", runs.gather_view)
    return reads


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("grad_scaling", ["none", "site"])
def test_embedding_reads_rows_only_and_matches_the_whole_weight(padding_idx, grad_scaling, monkeypatch):
    torch.manual_seed(0)
    model = roastfx.compress(nn.Embedding(101, 37, padding_idx=padding_idx).double(), "7x", seed=1,
                             grad_scaling=grad_scaling)
    ids = torch.randint(0, 101, (5, 9), generator=torch.Generator().manual_seed(2))
    ids[0, :3] = 3  # repeated ids, and the padding row where there is one
    reads = count_view_reads(monkeypatch)
    out = model(ids)
    assert reads == []  # the table was not built
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out * target).sum().backward()

    memory, weight = whole_weight_reference(model)
    if grad_scaling == "site":
        from roastfx.codegen.grad_norm import site_grad_norm
        weight = site_grad_norm(weight)
    want = nn.functional.embedding(ids, weight, padding_idx=padding_idx)
    (want * target).sum().backward()
    assert torch.equal(out, want.detach())
    torch.testing.assert_close(model.roast_memory.grad, memory.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_reads_rows_only_and_matches_the_whole_weight(mode, monkeypatch):
    torch.manual_seed(0)
    model = roastfx.compress(nn.EmbeddingBag(53, 19, mode=mode).double(), "5x", seed=2)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 53, (17,), generator=gen)
    offsets = torch.tensor([0, 4, 4, 11])  # an empty bag included
    psw = torch.rand(17, generator=gen, dtype=torch.float64) if mode == "sum" else None
    memory, weight = whole_weight_reference(model)
    reads = count_view_reads(monkeypatch)
    for args, ref_args in (((ids, offsets, psw), (ids, weight, offsets)), ((ids[:12].reshape(3, 4),), None)):
        model.zero_grad()
        memory.grad = None
        out = model(*args)
        ref = (nn.functional.embedding_bag(ids, weight, offsets, mode=mode, per_sample_weights=psw)
               if ref_args else nn.functional.embedding_bag(args[0], weight, mode=mode))
        assert reads == []
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-15)
        target = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (out * target).sum().backward()
        (ref * target).sum().backward(retain_graph=True)
        torch.testing.assert_close(model.roast_memory.grad, memory.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("options", [dict(max_norm=0.5), dict(scale_grad_by_freq=True), dict(sparse=True)])
def test_options_that_need_the_whole_weight_still_work(options, monkeypatch):
    torch.manual_seed(0)
    model = roastfx.compress(nn.Embedding(40, 16, **options).double(), "4x", seed=3, init="random")
    ids = torch.tensor([[1, 2, 2, 39], [0, 5, 5, 5]])
    reads = count_view_reads(monkeypatch)
    out = model(ids)
    assert len(reads) == 1  # the whole weight, as nn.Embedding reads it
    out.square().sum().backward()
    memory, weight = whole_weight_reference(model)
    # max_norm renormalizes (in place) a copy of the weight read from the memory: the memory is unchanged
    want = nn.functional.embedding(ids, weight.clone(), **{k: v for k, v in options.items() if k != "sparse"})
    assert torch.equal(model.roast_memory, memory)
    if "max_norm" in options:
        assert weight.norm(dim=1).max() > 0.5 and out.norm(dim=-1).max() <= 0.5 + 1e-6
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.roast_memory.grad, memory.grad, rtol=1e-12, atol=1e-14)


def test_fp32_memory_under_bf16_embedding_gives_bf16_rows():
    model = roastfx.compress(nn.Embedding(30, 24).bfloat16(), "3x", memory_dtype="float32", init="random")
    ids = torch.tensor([[0, 29, 7]])
    out = model(ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, nn.functional.embedding(ids, model.weight))


@pytest.mark.parametrize("bad", [-1, 30])
def test_an_index_out_of_range_is_an_index_error(bad):
    model = roastfx.compress(nn.Embedding(30, 24), "3x", init="random")
    before = model.roast_memory.detach().clone()
    with pytest.raises(IndexError, match=rf"embedding index {bad} is out of range for 30 rows .*\[0, 30\)"):
        model(torch.tensor([[0, bad]]))
    assert torch.equal(model.roast_memory, before)


def test_a_tied_head_still_reads_the_whole_table():
    """GPT-2 style: the lm_head reads the embedding's site (the whole view); the embedding reads rows."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(45, 20)
            self.head = nn.Linear(20, 45, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))

    torch.manual_seed(0)
    model = roastfx.compress(Tied().double(), "4x", seed=4)
    ids = torch.randint(0, 45, (3, 6), generator=torch.Generator().manual_seed(5))
    out = model(ids)
    out.square().sum().backward()
    memory, weight = whole_weight_reference(model)
    want = nn.functional.linear(torch.tanh(nn.functional.embedding(ids, weight)), weight)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.roast_memory.grad, memory.grad, rtol=1e-12, atol=1e-14)


def test_a_lookup_can_be_written_in_place():
    """h = emb(ids); h += pos: the rows come back as a tensor of their own, not a view autograd must guard."""
    torch.manual_seed(0)
    model = roastfx.compress(nn.Embedding(30, 12).double(), "3x", seed=5)
    ids = torch.tensor([[0, 4, 4, 29]])
    pos = torch.randn(4, 12, dtype=torch.float64)
    h = model(ids)
    h += pos
    h.square().sum().backward()
    memory, weight = whole_weight_reference(model)
    (nn.functional.embedding(ids, weight) + pos).square().sum().backward()
    torch.testing.assert_close(model.roast_memory.grad, memory.grad, rtol=1e-12, atol=1e-14)


def test_as_many_ids_as_rows_read_the_whole_weight(monkeypatch):
    """A position or token-type table looked up more times than it has rows: one read of the whole weight."""
    torch.manual_seed(0)
    model = roastfx.compress(nn.Embedding(6, 16).double(), "2x", seed=6)
    ids = torch.randint(0, 6, (3, 4), generator=torch.Generator().manual_seed(7))
    reads = count_view_reads(monkeypatch)
    out = model(ids)
    assert len(reads) == 1
    memory, weight = whole_weight_reference(model)
    torch.testing.assert_close(out, nn.functional.embedding(ids, weight), rtol=0, atol=0)


@pytest.mark.parametrize("cols", [32, 40])  # the view's width a whole number of hash tile columns, and not
def test_looked_up_rows_can_be_changed_in_place(cols):
    """The rows an eager lookup returns are a tensor of their own, not a view made inside the op: a caller may
    add to them in place (BLIP's text embeddings do `embeddings += position_embeddings`), with the same
    values and memory gradient as the out-of-place sum."""
    model = roastfx.compress(nn.Embedding(200, cols), "4x", init="random", seed=3)
    ids = torch.randint(0, 200, (3, 5), generator=torch.Generator().manual_seed(0))
    shift = torch.randn(5, cols, generator=torch.Generator().manual_seed(1))
    expected = model(ids) + shift
    expected.square().sum().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    rows = model(ids)
    rows += shift
    rows.square().sum().backward()
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    torch.testing.assert_close(model.roast_memory.grad, grad, rtol=0, atol=0)
