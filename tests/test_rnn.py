"""RNNs step by step (roastfx/rnn.py): the decomposition against torch's own RNN ops in float64, and
compressed RNNs through the roast backend with every weight read a roast op."""
import pytest
import torch
from torch import nn

import roastfx
from roastfx.rnn import decomposed_forward

CASES = {  # name: (module factory, input shape, with initial state)
    "lstm": (lambda: nn.LSTM(5, 7), (6, 3, 5), False),
    "lstm-2layer-bidir-proj-batch-first": (lambda: nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=4,
                                                           batch_first=True), (3, 6, 5), True),
    "gru-2layer-bidir": (lambda: nn.GRU(5, 7, num_layers=2, bidirectional=True), (6, 3, 5), True),
    "gru-no-bias-unbatched": (lambda: nn.GRU(5, 7, bias=False), (6, 5), True),
    "rnn-tanh-batch-first": (lambda: nn.RNN(5, 7, batch_first=True), (3, 6, 5), False),
    "rnn-relu-2layer-bidir-unbatched": (lambda: nn.RNN(5, 7, num_layers=2, nonlinearity="relu",
                                                       bidirectional=True), (6, 5), True),
}


def _initial_state(module, x, gen):
    directions = 2 if module.bidirectional else 1
    batch = () if x.dim() == 2 else (x.shape[0 if module.batch_first else 1],)
    out = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    h = torch.randn(module.num_layers * directions, *batch, out, dtype=torch.float64, generator=gen)
    if module.mode == "LSTM":
        return h.requires_grad_(), torch.randn(module.num_layers * directions, *batch, module.hidden_size,
                                               dtype=torch.float64, generator=gen).requires_grad_()
    return h.requires_grad_()


def _flat(out):
    return [t for t in (out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],)))]


@pytest.mark.parametrize("name", list(CASES))
def test_decomposition_equals_torchs_rnn_op_in_float64(name):
    build, shape, with_state = CASES[name]
    torch.manual_seed(0)
    module = build().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    hx = _initial_state(module, x, gen) if with_state else None
    want = _flat(module(x, hx))
    got = _flat(decomposed_forward(module, x, hx))
    leaves = [x, *(hx if isinstance(hx, tuple) else [hx] if hx is not None else []), *module.parameters()]
    upstream = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in want]
    _assert_same_outputs_and_gradients(got, want, upstream, leaves, (1e-10, 1e-12), (1e-9, 1e-11))


def _assert_same_outputs_and_gradients(got, want, upstream, leaves, out_tol, grad_tol):
    """The decomposition's outputs ``got`` equal torch's ``want`` to out_tol (rtol, atol), and so do the
    gradients of sum(output * upstream) with respect to ``leaves`` to grad_tol."""
    assert [t.shape for t in got] == [t.shape for t in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=out_tol[0], atol=out_tol[1])
    grads_want = torch.autograd.grad(sum((t * u).sum() for t, u in zip(want, upstream)), leaves)
    grads_got = torch.autograd.grad(sum((t * u).sum() for t, u in zip(got, upstream)), leaves)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=grad_tol[0], atol=grad_tol[1])


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True, bidirectional=True, proj_size=6)
        self.gru = nn.GRU(12, 10, batch_first=True)
        self.head = nn.Linear(10, 5)

    def forward(self, ids):
        h, _ = self.lstm(self.emb(ids))
        h, _ = self.gru(h)
        return self.head(h)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_compressed_rnns_compile_with_every_weight_read_fused(path, monkeypatch):
    """A compressed LSTM/GRU model through torch.compile(backend="roast"): compress turns on dynamo's
    allow_rnn, the RNNs run step by step, and every weight read becomes a roast op (no dense weight), with
    eager's outputs and memory gradient (eager runs torch's RNN ops on the materialized weights)."""
    from test_fuse_roast_ops import record_uses

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(Tagger(), "4x", init="random")
    assert torch._dynamo.config.allow_rnn
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(3))
    eager = model(ids)
    want = torch.autograd.grad(eager.square().mean(), model.roast_memory)[0]
    uses = record_uses(monkeypatch)
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(ids)
    got = torch.autograd.grad(out.square().mean(), model.roast_memory)[0]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # per LSTM layer and direction: 1 input projection, 5 recurrent steps, 5 projections; the GRU: 1 + 5;
    # the embedding and the head
    assert len(uses) == 2 * 2 * (1 + 5 + 5) + (1 + 5) + 2, [u.why for u in uses]
    assert all(u.fused for u in uses), [u.why for u in uses if not u.fused]


PACKED = {  # name: (module factory, lengths, enforce_sorted, with initial state)
    "lstm-2layer-bidir-proj-batch-first-unsorted": (
        lambda: nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=4, batch_first=True), [3, 6, 1, 4],
        False, True),
    "gru-2layer-bidir-sorted": (lambda: nn.GRU(5, 7, num_layers=2, bidirectional=True), [6, 4, 4, 1], True, False),
    "rnn-relu-unsorted": (lambda: nn.RNN(5, 7, nonlinearity="relu"), [2, 5, 5], False, True),
}


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_decomposition_equals_torchs_rnn_op_in_float64(name):
    """A PackedSequence step by step: outputs, final states and every gradient equal torch's op's, for
    sorted and unsorted batches, with and without an initial state (each sequence's last step is its own)."""
    from roastfx.rnn import decomposed_packed_forward

    build, lengths, enforce_sorted, with_state = PACKED[name]
    torch.manual_seed(0)
    module = build().double()
    gen = torch.Generator().manual_seed(2)
    batch, steps = len(lengths), max(lengths)
    shape = (batch, steps, 5) if module.batch_first else (steps, batch, 5)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=module.batch_first,
                                               enforce_sorted=enforce_sorted)
    hx = _initial_state(module, x, gen) if with_state else None
    want_out, want_state = module(packed, hx)
    got_out, got_state = decomposed_packed_forward(module, packed, hx)
    assert torch.equal(got_out.batch_sizes, want_out.batch_sizes)
    want = [want_out.data, *(want_state if isinstance(want_state, tuple) else (want_state,))]
    got = [got_out.data, *(got_state if isinstance(got_state, tuple) else (got_state,))]
    assert [t.shape for t in got] == [t.shape for t in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    leaves = [x, *(hx if isinstance(hx, tuple) else [hx] if hx is not None else []), *module.parameters()]
    upstream = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in want]
    # both graphs start from the one packing of x: keep it for the second
    grads_want = torch.autograd.grad(sum((t * u).sum() for t, u in zip(want, upstream)), leaves, retain_graph=True)
    grads_got = torch.autograd.grad(sum((t * u).sum() for t, u in zip(got, upstream)), leaves)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


class PackedTagger(nn.Module):
    """Variable-length sequences packed (unsorted) around a bidirectional LSTM."""

    def __init__(self, enforce_sorted):
        super().__init__()
        self.enforce_sorted = enforce_sorted
        self.emb = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 5)

    def forward(self, ids, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(ids), lengths, batch_first=True,
                                                   enforce_sorted=self.enforce_sorted)
        out, (h, _) = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.head(out).sum(1) + h.sum(0)[:, :5]


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch < 2.13's dynamo traces the model's pad_packed_sequence on fake data and fails once "
                           "allow_rnn is on (a dense LSTM too); 2.13 skips that function")
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequences_compile_with_every_weight_read_fused(enforce_sorted, monkeypatch):
    """A compressed LSTM fed a PackedSequence through torch.compile(backend="roast"): eager's outputs and
    memory gradient, and every weight read a roast op (no materialized weight)."""
    from test_fuse_roast_ops import record_uses

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(PackedTagger(enforce_sorted), "4x", init="random")
    ids = torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([6, 4, 2] if enforce_sorted else [4, 6, 2])
    eager = model(ids, lengths)
    want = torch.autograd.grad(eager.square().mean(), model.roast_memory)[0]
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(ids, lengths)
    got = torch.autograd.grad(out.square().mean(), model.roast_memory)[0]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # per direction: 1 input projection and 6 recurrent steps (the longest sequence); the embedding; the head
    assert len(uses) == 2 * (1 + 6) + 2, [u.why for u in uses]
    assert all(u.fused for u in uses), [u.why for u in uses if not u.fused]


def test_site_gradient_scaling_compiled_equals_eager(monkeypatch):
    """grad_scaling="site" normalizes each read's gradient: torch's RNN op (eager) reads weight_hh once, so the
    step-by-step forward reads it once too (the roast backend then materializes it, saying why) and the
    compiled memory gradient equals eager's. Per-step reads would give each step its own unit gradient."""
    from test_fuse_roast_ops import record_uses

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(nn.Sequential(nn.LSTM(8, 16, proj_size=6)), "4x", init="random", grad_scaling="site")
    x = torch.randn(5, 3, 8)
    eager = model(x)[0]
    want = torch.autograd.grad(eager.square().mean(), model.roast_memory)[0]
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)[0]
    got = torch.autograd.grad(out.square().mean(), model.roast_memory)[0]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    fused = [u for u in uses if u.fused]
    assert len(fused) == 1  # the input projection, read once for all steps
    assert len(uses) == 3 and all("other users" in u.why for u in uses if not u.fused)


CELLS = {  # name: (cell factory, input shape, with initial state)
    "lstm-cell": (lambda: nn.LSTMCell(5, 7), (3, 5), True),
    "lstm-cell-unbatched-zero-state": (lambda: nn.LSTMCell(5, 7, bias=False), (5,), False),
    "gru-cell": (lambda: nn.GRUCell(5, 7), (3, 5), True),
    "rnn-cell-relu-unbatched": (lambda: nn.RNNCell(5, 7, nonlinearity="relu"), (5,), True),
    "rnn-cell-tanh": (lambda: nn.RNNCell(5, 7), (3, 5), False),
}


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_decomposition_equals_torchs_cell_op_in_float64(name):
    """decomposed_cell (two F.linear and the gates) against torch's own cell (its aten op), forward and
    backward, batched and unbatched, with and without an initial state."""
    from roastfx.rnn import decomposed_cell

    build, shape, with_state = CELLS[name]
    torch.manual_seed(0)
    cell = build().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    state_shape = (*shape[:-1], cell.hidden_size)
    hx = None
    if with_state:
        hx = tuple(torch.randn(state_shape, dtype=torch.float64, generator=gen) for _ in range(2))
        hx = hx if isinstance(cell, nn.LSTMCell) else hx[0]
    want, got = cell(x, hx), decomposed_cell(cell, x, hx)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    upstream = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in want]
    _assert_same_outputs_and_gradients(got, want, upstream, [x, *cell.parameters()], (1e-12, 1e-12), (1e-10, 1e-12))


class CellDecoder(nn.Module):
    """A decoder loop over RNN cells, as seq2seq and reinforcement-learning code writes one."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTMCell(6, 12)
        self.gru = nn.GRUCell(12, 10)
        self.rnn = nn.RNNCell(10, 6, nonlinearity="relu")

    def forward(self, x, steps: int = 3):
        state, outs = None, []
        for _ in range(steps):
            state = self.lstm(x, state)
            x = self.rnn(self.gru(state[0]))
            outs.append(x)
        return torch.stack(outs)


def test_compressed_rnn_cells_compile_with_every_weight_read_fused(monkeypatch):
    """nn.LSTMCell, nn.GRUCell and nn.RNNCell are sites (weight_ih and weight_hh); under torch.compile each
    compressed cell runs as two F.linear and its gates, so every read is a roast_linear; compiled equals eager
    (torch's cell ops on the materialized weights), memory gradient included."""
    from test_fuse_roast_ops import record_uses

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(CellDecoder().double(), "3x", init="random", memory_dtype="float64")
    assert [s.name for s in roastfx.roast_state(model).plan.sites] == [
        f"{m}.weight_{w}" for m in ("lstm", "gru", "rnn") for w in ("ih", "hh")]
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eager = model(x)
    want = torch.autograd.grad(eager.square().mean(), model.roast_memory)[0]
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    got = torch.autograd.grad(out.square().mean(), model.roast_memory)[0]
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert len(uses) == 3 * 3 * 2 and all(u.fused for u in uses), [u.why for u in uses]
