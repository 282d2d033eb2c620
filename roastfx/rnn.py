"""RNNs (nn.LSTM, nn.GRU, nn.RNN, and their cells) step by step, so that every weight read is a matmul a roast op
can take.

torch's RNN modules hand all their weights at once to one aten op (``lstm``, ``gru``, ``rnn_tanh``,
``rnn_relu``), which needs them dense. Under torch.compile a compressed RNN module runs this
decomposition instead: per layer and direction, the input projection of every time step as one
``F.linear`` with ``weight_ih``, then one ``F.linear`` with ``weight_hh`` per step and the gate
arithmetic; the roast backend rewrites each of those reads into a ``roast_linear``. (With
grad_scaling="site" the recurrent weights are read once per layer and direction instead, as torch's op
reads them, so that their gradient is normalized once, as in eager.) Eager calls keep
torch's op (faster on CPU, and the reference the decomposition is tested against). A PackedSequence
runs the same steps over its padded (time, batch) form, each sequence's state held where its steps have
ended, and its data is gathered back into the packed order.

The cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell) hand their weights to one aten op per step (``lstm_cell``,
...); under torch.compile a compressed cell runs the same step as two ``F.linear`` and the gates.

Dynamo only traces an RNN module with ``torch._dynamo.config.allow_rnn`` on; ``compress`` turns it on
when a model has compressed RNN weights (module.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from roastfx.codegen.recurrent import rnn_gates

DECOMPOSED = (nn.LSTM, nn.GRU, nn.RNN)  # exactly these classes: a user subclass keeps its own forward
CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)  # one step each: the same decomposition, exactly these classes


def roast_rnn_forward(self, input, hx=None):
    """forward of a compressed nn.LSTM / nn.GRU / nn.RNN: torch's own in eager, the step-by-step
    decomposition while dynamo traces it."""
    if not torch.compiler.is_compiling():
        return type(self)._roast_base_class.forward(self, input, hx)
    if isinstance(input, PackedSequence):
        return decomposed_packed_forward(self, input, hx)
    return decomposed_forward(self, input, hx)


def roast_cell_forward(self, input, hx=None):
    """forward of a compressed nn.LSTMCell / nn.GRUCell / nn.RNNCell: torch's own in eager (its aten cell op,
    on the weights read from the memory), `decomposed_cell` while dynamo traces it."""
    if not torch.compiler.is_compiling():
        return type(self)._roast_base_class.forward(self, input, hx)
    return decomposed_cell(self, input, hx)


def decomposed_cell(cell: nn.RNNCellBase, input: torch.Tensor, hx=None):
    """What ``cell.forward(input, hx)`` returns, as two ``F.linear`` (input and hidden projections) and the
    gate arithmetic: batched (B, in) or unbatched (in,) input, hx given or zeros."""
    name = type(cell)._roast_base_class.__name__ if hasattr(type(cell), "_roast_base_class") else type(cell).__name__
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    lstm = isinstance(cell, nn.LSTMCell)
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    if hx is None:
        h = c = x.new_zeros(x.shape[0], cell.hidden_size)
    else:
        h, c = hx if lstm else (hx, None)
        if not batched:
            h, c = h.unsqueeze(0), c.unsqueeze(0) if c is not None else None
    mode = "LSTM" if lstm else "GRU" if isinstance(cell, nn.GRUCell) else f"RNN_{cell.nonlinearity.upper()}"
    h, c = rnn_gates(mode, F.linear(x, cell.weight_ih, cell.bias_ih), F.linear(h, cell.weight_hh, cell.bias_hh), h,
                  c if lstm else None)
    if not batched:
        h, c = h.squeeze(0), c.squeeze(0) if lstm else None
    return (h, c) if lstm else h


def decomposed_packed_forward(module: nn.RNNBase, input: PackedSequence, hx=None):
    """What ``module.forward(input, hx)`` returns for a PackedSequence: the steps of `decomposed_forward`
    over the padded (time, batch) form, where sequence b takes step t only if t < its length (its state is
    held otherwise, so a reverse direction starts at each sequence's own last step). The shapes stay those
    of the packed data: the padded form is a gather of it and the output a gather back."""
    data, batch_sizes, sorted_indices, unsorted_indices = input
    steps = batch_sizes.shape[0]
    if sorted_indices is not None:
        batch = sorted_indices.shape[0]
    elif hx is not None:
        batch = (hx[0] if module.mode == "LSTM" else hx).shape[1]
    else:  # a value, not a shape: read outside the graph (a graph break, as the packing itself is)
        batch = torch.compiler.disable(_first)(batch_sizes)  # (not at import: that would import triton)
    if hx is not None and sorted_indices is not None:  # torch's op takes the state in the sorted order
        hx = _permute_state(hx, sorted_indices)
    sizes = batch_sizes.to(data.device)
    offsets = torch.cumsum(sizes, 0) - sizes  # where step t's rows start in data
    column = torch.arange(batch, device=data.device)
    active = column < sizes[:, None]  # (T, B): sequence b has a step t
    rows = (offsets[:, None] + column).clamp(max=data.shape[0] - 1)
    padded = data[rows] * active[..., None].to(data.dtype)
    if module.batch_first:  # a packed sequence's data is time-major whatever the module's layout
        output, state = decomposed_forward(module, padded.transpose(0, 1), hx, active=active)
        output = output.transpose(0, 1)
    else:
        output, state = decomposed_forward(module, padded, hx, active=active)
    # row i of the packed data is step t_i of sequence i - offsets[t_i]
    step_of_row = torch.repeat_interleave(torch.arange(steps, device=data.device), sizes,
                                          output_size=data.shape[0])
    packed = output[step_of_row, torch.arange(data.shape[0], device=data.device) - offsets[step_of_row]]
    if unsorted_indices is not None:
        state = _permute_state(state, unsorted_indices)
    return PackedSequence(packed, batch_sizes, sorted_indices, unsorted_indices), state


def _permute_state(state, index: torch.Tensor):
    """An RNN state (h, or the LSTM's (h, c)) with its batch dim (1) reordered by ``index``."""
    return tuple(s.index_select(1, index) for s in state) if isinstance(state, tuple) else state.index_select(1, index)


def _first(sizes: torch.Tensor) -> int:
    return int(sizes[0])


def decomposed_forward(module: nn.RNNBase, input: torch.Tensor, hx=None, active=None):
    """What ``module.forward(input, hx)`` returns, computed one layer, direction and time step at a time
    from the module's weight attributes (any mode, layers, bidirectional, batch_first, proj_size,
    dropout between layers in training, unbatched input). ``active``: a (time, batch) bool tensor for a
    time-major input, False where a sequence has ended (its state is held; its output there is 0)."""
    mode = module.mode
    lstm = mode == "LSTM"
    if input.dim() not in (2, 3):
        raise ValueError(f"{type(module).__name__}: expected input to be 2-D or 3-D, got {input.dim()}-D")
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1 if not module.batch_first else 0)
    if module.batch_first:
        x = x.transpose(0, 1)  # (T, B, in)
    batch = x.shape[1]
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size if lstm and module.proj_size > 0 else module.hidden_size
    layers_states = module.num_layers * directions
    if hx is None:
        h0 = x.new_zeros(layers_states, batch, out_size)
        c0 = x.new_zeros(layers_states, batch, module.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
    layer_input = x
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            h, c = _run_direction(module, layer, direction, layer_input, h0[index], c0[index] if lstm else None,
                                  active)
            outputs.append(h[0])
            h_n.append(h[1])
            if lstm:
                c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, True)
    output = layer_input.transpose(0, 1) if module.batch_first else layer_input
    h_n = torch.stack(h_n)
    c_n = torch.stack(c_n) if lstm else None
    if not batched:
        output = output.squeeze(0 if module.batch_first else 1)
        h_n = h_n.squeeze(1)
        c_n = c_n.squeeze(1) if lstm else None
    return (output, (h_n, c_n)) if lstm else (output, h_n)


def _weights(module: nn.RNNBase, layer: int, direction: int, name: str):
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    return getattr(module, name + suffix, None)


def _run_direction(module, layer, direction, x, h, c, active=None):
    """((outputs (T, B, out), last h), last c) of one layer and direction over the time steps of x (T, B, in),
    holding the state of a sequence where ``active`` (T, B) is False. Every weight read is its own attribute
    access, so each step's matmul is its own roast op."""
    mode = module.mode
    bias_ih = _weights(module, layer, direction, "bias_ih")
    bias_hh = _weights(module, layer, direction, "bias_hh")
    # the input projection of every step in one matmul
    gates_x = F.linear(x, _weights(module, layer, direction, "weight_ih"), bias_ih)
    order = range(x.shape[0] - 1, -1, -1) if direction else range(x.shape[0])
    outputs = [None] * x.shape[0]
    # With grad_scaling="site" each read's gradient is normalized on its own, so a weight read once per step
    # would get T unit-RMS gradients where torch's op (eager) gets one: read the recurrent weights once
    # (the roast backend then materializes them, logged, since one read has several users). Otherwise one
    # read per step, each its own fused roast op.
    state = module.__dict__.get("_roast_state")
    once = getattr(getattr(state, "plan", None), "grad_scaling", "none") == "site"
    weight_hh = _weights(module, layer, direction, "weight_hh") if once else None
    weight_hr = _weights(module, layer, direction, "weight_hr") if once else None
    for t in order:
        h_before, c_before = h, c
        gates_h = F.linear(h, weight_hh if once else _weights(module, layer, direction, "weight_hh"), bias_hh)
        h, c = rnn_gates(mode, gates_x[t], gates_h, h, c)
        if mode == "LSTM":
            projection = weight_hr if once else _weights(module, layer, direction, "weight_hr")
            if projection is not None:
                h = F.linear(h, projection)
        if active is not None:
            step = active[t, :, None]
            outputs[t] = h * step.to(h.dtype)
            h = torch.where(step, h, h_before)
            c = torch.where(step, c, c_before) if c is not None else None
            continue
        outputs[t] = h
    return (torch.stack(outputs), h), c
