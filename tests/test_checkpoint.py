"""Checkpoints: state_dict and safetensors round-trips, loading into a fresh dense model."""
import pytest
import torch
from torch import nn

import roastfx
from helpers import MLP, Mixed, mixed_inputs, snapshot, assert_unchanged


def trained_mixed():
    model = Mixed()
    roastfx.compress(model, "6x", example_inputs=mixed_inputs(), seed=7, init="random")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(*mixed_inputs()).square().mean().backward()
        opt.step()
    return model


def test_state_dict_round_trip_is_bit_exact():
    model = trained_mixed()
    sd = model.state_dict()
    assert "_extra_state" in sd and "roast_memory" in sd
    other = Mixed()
    roastfx.compress(other, "6x", example_inputs=mixed_inputs(), seed=7, init="random")
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert (v == sd[k]) if isinstance(v, dict) else torch.equal(v, sd[k]), k
    inputs = mixed_inputs(4, 6)
    assert torch.equal(model(*inputs), other(*inputs))


def test_state_dict_is_all_tensors_and_saves_with_safetensors_alone(tmp_path):
    """Every value of a compressed model's state_dict is a tensor (the plan: its JSON as uint8), so
    safetensors.torch.save_file takes it as it is (as transformers' Trainer saves a plain nn.Module); loaded
    into a model compressed with another seed, it brings its plan along. A dict {'plan': json} (how state dicts
    saved before 2026-12-07 hold it) loads the same."""
    from safetensors.torch import load_file, save_file

    model = trained_mixed()
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["_extra_state"].dtype == torch.uint8
    assert roastfx.Plan.from_json(bytes(sd["_extra_state"].tolist()).decode()) == roastfx.roast_state(model).plan
    save_file(sd, tmp_path / "sd.safetensors")
    inputs = mixed_inputs(4, 6)
    for state in (load_file(tmp_path / "sd.safetensors"),
                  {**sd, "_extra_state": {"plan": roastfx.roast_state(model).plan.to_json()}}):
        other = Mixed()
        roastfx.compress(other, "6x", example_inputs=mixed_inputs(), seed=8, init="random")
        assert roastfx.roast_state(other).plan != roastfx.roast_state(model).plan
        other.load_state_dict(state)
        assert roastfx.roast_state(other).plan == roastfx.roast_state(model).plan
        assert torch.equal(model(*inputs), other(*inputs))


def test_safetensors_round_trip_into_fresh_dense_model(tmp_path):
    model = trained_mixed()
    path = tmp_path / "model.safetensors"
    roastfx.save(model, path)
    loaded = roastfx.load(Mixed, path)  # a factory building a dense model
    assert roastfx.roast_state(loaded).plan == roastfx.roast_state(model).plan
    assert torch.equal(loaded.roast_memory, model.roast_memory)
    inputs = mixed_inputs(2, 5)
    assert torch.equal(model(*inputs), loaded(*inputs))
    # and into an existing compressed model built with a different seed: the checkpoint's plan wins
    other = Mixed()
    roastfx.compress(other, "6x", example_inputs=mixed_inputs(), seed=99)
    roastfx.load(other, path)
    assert torch.equal(model(*inputs), other(*inputs))


def test_plan_fields_survive(tmp_path):
    model = MLP()
    roastfx.compress(model, "20x", seed=5, target="a100", tile=(8, 16), alignment=8)
    path = tmp_path / "m.safetensors"
    roastfx.save(model, path)
    plan = roastfx.read_plan(path)
    assert plan.seed == 5 and plan.target == "a100" and plan.schema_version == 1
    assert all((s.mapping.tile_rows, s.mapping.tile_cols, s.mapping.alignment) == (8, 16, 8) for s in plan.sites)
    assert [s.scale for s in plan.sites] == [s.scale for s in roastfx.roast_state(model).plan.sites]


def test_checkpoint_from_another_architecture_is_rejected_and_model_unchanged(tmp_path):
    model = MLP()
    roastfx.compress(model, "20x")
    path = tmp_path / "m.safetensors"
    roastfx.save(model, path)
    wrong = MLP(d_in=32)
    snap = snapshot(wrong)
    with pytest.raises(ValueError, match="another architecture"):
        roastfx.load(wrong, path)
    assert_unchanged(wrong, snap)
    wrong2 = nn.Sequential(nn.Linear(64, 128))
    snap2 = snapshot(wrong2)
    with pytest.raises(ValueError, match="another architecture"):
        roastfx.load(wrong2, path)
    assert_unchanged(wrong2, snap2)


def test_not_a_roastfx_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="not a roastfx checkpoint"):
        roastfx.load(MLP(), path)


def test_save_requires_compressed_model(tmp_path):
    with pytest.raises(ValueError, match="compress"):
        roastfx.save(MLP(), tmp_path / "x.safetensors")


def test_grouped_sites_round_trip_into_a_fresh_model(tmp_path):
    """A mixture of experts' stacked weights (grouped sites, found by running the model) save and load: the
    loaded model computes what the saved one did."""
    from test_compress import LoopedExperts

    torch.manual_seed(0)
    x = torch.randn(10, 8)
    model = roastfx.compress(LoopedExperts(), "2x", init="random", example_inputs=(x,))
    assert [s.op for s in roastfx.roast_state(model).plan.sites] == ["linear", "grouped", "grouped"]
    path = tmp_path / "moe.safetensors"
    roastfx.save(model, path)
    loaded = roastfx.load(LoopedExperts, path)
    assert [s.op for s in roastfx.roast_state(loaded).plan.sites] == ["linear", "grouped", "grouped"]
    assert torch.equal(loaded(x), model(x))
