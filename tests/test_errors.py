"""Bad input: a clear error naming the value and what is accepted; the model left as it was."""
import warnings

import pytest
import torch
from torch import nn

import roastfx
from helpers import MLP, assert_unchanged, snapshot


@pytest.mark.parametrize("kwargs,match", [
    ({"compression": 0}, r"compression=0 is outside \(0, 1\]"),
    ({"compression": 1.5}, r"compression=1.5 is outside \(0, 1\]"),
    ({"compression": -0.1}, r"outside \(0, 1\]"),
    ({"compression": "lots"}, r"compression='lots' cannot be parsed; accepted: .*'100x'"),
    ({"compression": "0.5x"}, r"factor must be >= 1x"),
    ({"compression": "10GB"}, r"larger than the dense weights"),
    ({"compression": "2B"}, r"less than one 4-byte memory slot"),
    ({"compression": None}, r"compression=None is not valid"),
    ({"compression": "1000x", "tile": (32, 32)}, r"memory too small: site 'fc1.weight' needs a hash tile of 32x32"),
    ({"target": "tpu-v9"}, r"unknown target 'tpu-v9'; known targets: .*h100"),
    ({"colour": "red"}, r"unknown option\(s\) \['colour'\]; accepted options: tile"),
    ({"init": "zeros"}, r"init='zeros' is not valid; accepted: project, random"),
    ({"scheme": "pruning"}, r"scheme='pruning' is not valid; accepted: roast, roast-local, hashednet"),
    ({"exclude": ["fc9*"]}, r"exclude patterns \['fc9\*'\] match no compressible weight"),
    ({"tile": (0, 4)}, r"tile must be two positive ints"),
    ({"alignment": -2}, r"alignment must be a positive int"),
    ({"seed": -1}, r"seed=-1 must be a non-negative int"),
    ({"memory_dtype": "int8"}, r"memory_dtype='int8' is not supported; accepted: float32"),
    ({"memory_dtype": torch.int8}, r"memory_dtype=torch.int8 is not supported; accepted: float32"),
    ({"compression": "1000000x"}, r"compression='1000000x' leaves less than one memory slot for the 25856 weights to "
                                  r"compress; the most this model can be compressed is 25856x"),
    ({"compression": "1000x", "scheme": "roast-local", "alignment": 16},
     r"memory of 26 slots cannot give 3 sites a window each aligned to alignment=16 under scheme 'roast-local' "
     r"\(that needs 48 slots\)"),
    ({"compression": "1000x", "scheme": "roast-local", "alignment": 16, "planner": "cost"},
     r"cannot give 3 sites a window each aligned to alignment=16"),
    ({"exclude": ["*"]}, r"exclude=\['\*'\] excludes every weight that feeds a matmul-like op"),
    ({"exclude": [1]}, r"exclude=\[1\]: 1 is not a name pattern; accepted: strings"),
    ({"exclude": 3}, r"exclude=3 is not valid; accepted: a name pattern or a list of them"),
    ({"own_window": [None]}, r"own_window=\[None\]: None is not a name pattern"),
])
def test_bad_compress_arguments(kwargs, match):
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        roastfx.compress(model, **kwargs)
    assert_unchanged(model, snap)


def test_nothing_to_compress():
    model = nn.Sequential(nn.LayerNorm(8), nn.ReLU())
    snap = snapshot(model)
    with pytest.raises(ValueError, match="nothing to compress in Sequential"):
        roastfx.compress(model)
    assert_unchanged(model, snap)


def test_weight_that_cannot_be_tiled():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 0))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"site '1.weight' has shape \(0, 8\): an empty weight cannot be tiled"):
        roastfx.compress(model, 0.5)
    assert_unchanged(model, snap)


def test_compressing_a_model_that_holds_or_sits_in_a_compressed_one_is_an_error():
    """Two memories in one model could not be saved and loaded back: refused, nothing changed."""
    inner = roastfx.compress(MLP(), "10x")
    outer = nn.Sequential(inner, nn.Linear(10, 4))
    snap = snapshot(outer)
    with pytest.raises(ValueError, match=r"cannot compress Sequential: its submodule '0' belongs to a ROAST-compressed"):
        roastfx.compress(outer, "2x")
    assert_unchanged(outer, snap)
    model = roastfx.compress(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), "2x", exclude=["1.*"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot compress Linear: it is inside a ROAST-compressed Sequential"):
        roastfx.compress(model[1], "2x")
    with pytest.raises(ValueError, match=r"cannot apply a plan to Linear: it is inside a ROAST-compressed"):
        roastfx.apply_plan(model[1], roastfx.compress(nn.Linear(8, 4), "2x").__dict__["_roast_state"].plan)
    assert_unchanged(model, snap)


def test_partly_frozen_weights_stay_dense_with_a_warning():
    """The sites share one memory, trainable or not as a whole: beside trainable weights, a frozen one (a fixed
    sinusoidal table) is left dense, exactly as it was and still frozen, with a warning naming it and a note in
    the plan; training moves the memory and never it. Excluding it says the same without the warning."""
    torch.manual_seed(0)
    model = MLP()
    model.fc1.weight.requires_grad_(False)
    frozen = model.fc1.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"1 of the 3 weights to compress are frozen \(requires_grad=False: "
                                         r"\['fc1.weight'\]\) while the others train: they are left dense"):
        roastfx.compress(model, "10x")
    plan = roastfx.roast_state(model).plan
    assert [s.name for s in plan.sites] == ["fc2.weight", "out.weight"]
    assert any("frozen" in n and "fc1.weight" in n for n in plan.notes)
    assert isinstance(model.fc1.weight, nn.Parameter) and not model.fc1.weight.requires_grad
    torch.testing.assert_close(model.fc1.weight, frozen, rtol=0, atol=0)
    memory = model.roast_memory.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).square().sum().backward()
    opt.step()
    torch.testing.assert_close(model.fc1.weight, frozen, rtol=0, atol=0)
    assert not torch.equal(model.roast_memory, memory)
    other = MLP()
    other.fc1.weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roastfx.compress(other, "10x", exclude=["fc1.*"])


def test_weights_without_values_are_an_error():
    """A lazy module's weight before its first forward, and a model built on the meta device, hold no values to
    project or to scale a fresh memory by: a clear error saying what to do, the model left as it was."""
    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are uninitialized .*run the model once"):
        roastfx.compress(lazy, "2x", init="random")
    assert isinstance(lazy[0].weight, nn.parameter.UninitializedParameter)
    lazy(torch.randn(3, 5))  # initialized: now it compresses
    assert roastfx.compress(lazy, "2x").roast_memory.numel() > 0
    with torch.device("meta"):
        meta = MLP()
    names = [n for n, _ in meta.named_parameters()]
    with pytest.raises(ValueError, match=r"6 parameters are on the meta device .*roastfx plan MODULE:FACTORY --meta"):
        roastfx.compress(meta, "10x", init="random")
    assert [n for n, p in meta.named_parameters() if p.is_meta] == names


def test_compress_twice_is_an_error():
    model = roastfx.compress(MLP(), "10x")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already ROAST-compressed"):
        roastfx.compress(model, "10x")
    assert_unchanged(model, snap)


def test_not_a_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        roastfx.compress(lambda x: x)


def test_unknown_target_from_environment(monkeypatch):
    monkeypatch.setenv("ROASTFX_TARGET", "nope")
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unknown target 'nope'"):
        roastfx.compress(model)
    assert_unchanged(model, snap)


def test_backend_rejects_unknown_options():
    model = roastfx.compress(MLP(), "10x")
    compiled = torch.compile(model, backend="roast", options={"colour": "red"})
    with pytest.raises(Exception, match=r"unknown roast backend option\(s\) \['colour'\]; valid options"):
        compiled(torch.randn(2, 64))


@pytest.mark.parametrize("options,match", [
    ({"compression": "4x", "seed": "x"}, r"options\['seed'\]='x' is not valid; accepted: a non-negative int"),
    ({"compression": "4x", "seed": -2}, r"options\['seed'\]=-2 is not valid"),
    ({"compression": "4x", "exclude": [3]}, r"options\['exclude'\]=\[3\]: 3 is not a name pattern"),
])
def test_backend_rejects_bad_option_values(options, match):
    torch._dynamo.reset()
    model = MLP()
    snap = snapshot(model)
    compiled = torch.compile(model, backend="roast", options={**options, "inner": "eager"})
    with pytest.raises(Exception, match=match), torch.no_grad():
        compiled(torch.randn(2, 64))
    assert_unchanged(model, snap)


def test_untraceable_example_inputs_say_why_nothing_was_found():
    """Only functional weights, and example_inputs torch.export cannot trace nor the model run on (a wrong
    width): the error carries both failures rather than only 'no weight feeds a matmul-like op'."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: export fails
                return x @ self.w
            return -(x @ self.w)

    model = Functional()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"nothing to compress in Functional: .*; could not trace the model"):
        roastfx.compress(model, "2x", example_inputs=(torch.randn(3, 5),))
    assert_unchanged(model, snap)


def test_complex_weights_stay_dense_and_say_so(caplog):
    """A real memory cannot hold a complex weight's imaginary part: complex weights are left dense with a
    note (before, their imaginary parts were silently dropped); a model of complex weights only is refused."""
    import logging

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8, dtype=torch.complex64)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x).real)

    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(2, 8, dtype=torch.complex64)
    a_weight = model.a.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="roastfx"):
        roastfx.compress(model, "2x")
    assert [s.name for s in roastfx.roast_state(model).plan.sites] == ["b.weight"]
    assert "left dense, not floating-point (a memory holds real numbers): a.weight (complex64)" in caplog.text
    assert torch.equal(model.a.weight.detach(), a_weight) and model(x).shape == (2, 3)
    only_complex = nn.Sequential(nn.Linear(8, 4, dtype=torch.complex64))
    snap = snapshot(only_complex)
    with pytest.raises(ValueError, match=r"no floating-point weight .*; left dense, not floating-point .*0.weight "
                                         r"\(complex64\)"):
        roastfx.compress(only_complex, "2x")
    assert_unchanged(only_complex, snap)
