"""The quality benchmark's tasks train, and the schemes it compares keep their promises.

The HashedNet and local-sharing checks are written from the formulas (Python ints),
not from roastfx's own hashing code.
"""
import os
import sys

import pytest
import torch
from torch import nn

import roastfx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality_tasks as Q  # noqa: E402

P = 2**31 - 1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.conv = nn.Conv1d(12, 10, 3, padding=1)
        self.fc = nn.Linear(10, 7)

    def forward(self, ids):
        x = self.conv(self.emb(ids).transpose(1, 2)).mean(-1)
        return self.fc(torch.relu(x))


def hashednet_weight(memory: list[float], m: dict, scale: float, shape, transposed: bool) -> torch.Tensor:
    """HashedNets, one element at a time: B[k][n] = scale * sign(k, n) * memory[start + h(k, n) mod size]."""
    view = [[0.0] * m["cols"] for _ in range(m["rows"])]
    for k in range(m["rows"]):
        for n in range(m["cols"]):
            h = (m["a_row"] * k % P + m["a_col"] * n % P + m["b"]) % P
            g = (m["c_row"] * k % P + m["c_col"] * n % P + m["d"]) % P
            sign = -1.0 if (g >> 16) & 1 else 1.0
            view[k][n] = scale * sign * memory[m["window_start"] + h % m["window_size"]]
    view = torch.tensor(view, dtype=torch.float64)
    return view.t().reshape(shape) if transposed else view.reshape(shape)


def weights_of(model):
    return {"emb.weight": model.emb.weight, "conv.weight": model.conv.weight, "fc.weight": model.fc.weight}


@pytest.mark.parametrize("compression", ["4x", 0.05])
def test_hashednet_is_per_element_hashing_in_per_site_windows(compression):
    torch.manual_seed(0)
    model = roastfx.compress(Net(), compression, seed=3, init="random", scheme="hashednet")
    plan = roastfx.roast_state(model).plan
    memory = model.roast_memory.detach().double().tolist()
    got = weights_of(model)
    for site in plan.sites:
        m = site.mapping.to_dict()
        assert (m["tile_rows"], m["tile_cols"], m["alignment"]) == (1, 1, 1)
        want = hashednet_weight(memory, m, site.scale, site.shape, site.transposed)
        torch.testing.assert_close(got[site.name].detach().double(), want, rtol=1e-6, atol=1e-7)
    windows = sorted((s.mapping.window_start, s.mapping.window_size) for s in plan.sites)
    assert windows[0][0] == 0 and sum(size for _, size in windows) == plan.memory_size
    assert all(a + sa == b for (a, sa), (b, _) in zip(windows, windows[1:]))


def test_hashednet_memory_gradient_is_the_sum_over_its_elements():
    torch.manual_seed(1)
    model = roastfx.compress(Net(), "3x", seed=5, init="random", scheme="hashednet")
    plan = roastfx.roast_state(model).plan
    upstream = {name: torch.randn_like(w) for name, w in weights_of(model).items()}
    loss = sum((w * upstream[name]).sum() for name, w in weights_of(model).items())
    loss.backward()
    want = [0.0] * plan.memory_size
    for site in plan.sites:
        m = site.mapping.to_dict()
        up = upstream[site.name].double()
        up = up.reshape(up.shape[0], -1).t() if site.transposed else up.reshape(up.shape[0], -1)
        for k in range(m["rows"]):
            for n in range(m["cols"]):
                h = (m["a_row"] * k % P + m["a_col"] * n % P + m["b"]) % P
                g = (m["c_row"] * k % P + m["c_col"] * n % P + m["d"]) % P
                sign = -1.0 if (g >> 16) & 1 else 1.0
                want[m["window_start"] + h % m["window_size"]] += site.scale * sign * float(up[k, n])
    torch.testing.assert_close(model.roast_memory.grad.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_roast_local_gives_each_site_its_own_disjoint_window():
    torch.manual_seed(2)
    model = roastfx.compress(Net(), "5x", seed=1, init="random", scheme="roast-local")
    plan = roastfx.roast_state(model).plan
    owner = [None] * plan.memory_size
    for site in plan.sites:
        m = site.mapping
        for slot in range(m.window_start, m.window_start + m.window_size):
            assert owner[slot] is None, f"slot {slot} is in the windows of {owner[slot]} and {site.name}"
            owner[slot] = site.name
        index, _ = m.full_index()
        assert int(index.min()) >= m.window_start and int(index.max()) < m.window_start + m.window_size
    # a loss on one site moves only that site's window of the memory
    for site in plan.sites:
        model.zero_grad(set_to_none=True)
        weights_of(model)[site.name].square().sum().backward()
        touched = (model.roast_memory.grad != 0).nonzero().flatten().tolist()
        assert touched and all(owner[t] == site.name for t in touched)


def test_global_roast_shares_the_whole_memory_across_sites():
    model = roastfx.compress(Net(), "5x", seed=1, init="random", scheme="roast")
    plan = roastfx.roast_state(model).plan
    used = [set(s.mapping.full_index()[0].flatten().tolist()) for s in plan.sites]
    assert all(s.mapping.window_start == 0 and s.mapping.window_size == plan.memory_size for s in plan.sites)
    assert used[0] & used[1] and used[1] & used[2]


@pytest.fixture(scope="module")
def tasks():
    torch.set_num_threads(2)
    return {name: build(quick=True) for name, build in Q.TASKS.items()}


CHANCE = {"digits": 0.1, "mnist": 0.1, "tweets": 1 / 3}


@pytest.mark.parametrize("task_name,method", [
    ("digits", "roast"), ("digits", "roast-local"), ("digits", "hashednet"), ("digits", "small-dense"),
    ("mnist", "roast"), ("mnist", "hashednet"), ("tweets", "roast"),
])
def test_quick_experiment_reduces_the_loss_and_beats_chance(tasks, task_name, method):
    task = tasks[task_name]
    model, info = Q.make_model(task, method, None if method == "dense" else "10x", seed=0)
    if method in ("roast", "roast-local", "hashednet"):
        assert 9 <= info["ratio"] <= 10.1 and info["bytes"] == 4 * info["params"]
    if method == "small-dense":
        assert info["params"] <= info["budget_params"]
    before = Q.evaluate_loss(model, task.data[0])
    result = Q.train(task, model, seed=0)
    after = Q.evaluate_loss(model, task.data[0])
    assert after < before
    assert result["accuracy"] > CHANCE[task_name] + 0.05
    # a few steps of a from-scratch BERT reach the majority class; no method may do worse than it
    majority = float(torch.bincount(task.data[1][-1]).max()) / len(task.data[1][-1])
    assert task_name != "tweets" or result["accuracy"] >= majority - 0.02


def test_quality_script_writes_results(tmp_path):
    import quality

    rows = quality.main(["--quick", "--tasks", "digits", "--ratios", "10x", "--methods", "dense,roast,small-dense",
                         "--json", str(tmp_path / "q.json"), "--markdown", str(tmp_path / "r.md"),
                         "--plot", str(tmp_path / "q.png")])
    assert {r["method"] for r in rows} == {"dense", "roast", "small-dense"}
    text = (tmp_path / "r.md").read_text()
    assert "| roast | 10x |" in text and "python benchmarks/quality.py --quick" in text
    assert (tmp_path / "q.png").stat().st_size > 1000 and (tmp_path / "q.json").stat().st_size > 100


def test_recipe_choices_never_see_the_test_split(tasks):
    """validation_task scores on the end of the training split; the test split is untouched."""
    task = tasks["digits"]
    val = Q.validation_task(task, 50)
    (tr_x, tr_y), (te_x, te_y) = task.data
    (vtr_x, vtr_y), (v_x, v_y) = val.data
    assert len(vtr_y) + len(v_y) == len(tr_y) and len(v_y) == 50
    assert torch.equal(v_x, tr_x[-50:]) and torch.equal(vtr_x, tr_x[:-50])
    assert task.data[1][0] is te_x  # the original task keeps its test split
    model, _ = Q.make_model(task, "roast", "10x", seed=0)
    assert roastfx.roast_state(model).plan.grad_scaling == Q.GRAD_SCALING
