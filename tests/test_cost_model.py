import dataclasses
import math
import random
import time

import pytest
import torch

from roastfx.codegen.reference import slot_load
from roastfx.passes.capture_sites import SiteSpec
from roastfx.passes.cost_model import (
    T, Layout, analytic_load, costs, expected_collisions, expected_lines, geometry, memory_time, positions,
    predicted_time, roofline, slot_load_by_tiles, symbolic_costs,
)
from roastfx.passes.plan_cost import execution_graph, plan_with_cost_model
from roastfx.passes.plan_layout import MIN_POSITIONS, plan_layout
from roastfx.profiles import PROFILES

TOKENS = (1, 7, 128, 1000, 4096)


def lines_by_enumeration(span, alignment, itemsize, line):
    """Average lines touched over every aligned start offset in one period of the line."""
    period = line * alignment  # starts 0, a, 2a, ... cover every residue modulo the line
    starts = range(0, period, alignment)
    touched = [((s + span) * itemsize - 1) // line - (s * itemsize) // line + 1 for s in starts]
    return sum(touched) / len(touched)


def specs_of(shapes, op="linear"):
    return [SiteSpec(f"s{i}.weight", (f"s{i}.weight",), shape, op, op != "embedding", "float32")
            for i, shape in enumerate(shapes)]


def random_layout(rng, memory=200_000):
    rows, cols = rng.randint(1, 3000), rng.randint(1, 3000)
    tr, tc = 2 ** rng.randint(0, 6), 2 ** rng.randint(0, 6)
    return Layout(rows, cols, tr, tc, 2 ** rng.randint(0, 5), 0, memory)


def test_expected_lines_matches_enumeration():
    rng = random.Random(0)
    for _ in range(200):
        span, a = rng.randint(1, 3000), 2 ** rng.randint(0, 7)
        isz, line = rng.choice([1, 2, 4, 8]), rng.choice([32, 64, 128])
        assert expected_lines(span, a, isz, line) == pytest.approx(lines_by_enumeration(span, a, isz, line))


def test_aligned_runs_never_touch_more_lines():
    rng = random.Random(1)
    for _ in range(300):
        span, isz, line = rng.randint(1, 5000), rng.choice([2, 4]), rng.choice([64, 128])
        full = line // isz
        aligned = expected_lines(span, full, isz, line)
        assert aligned == math.ceil(span * isz / line)
        previous = None
        for a in (1, 2, 4, 8, 16, 32, 64):  # coarser alignment: never more lines
            now = expected_lines(span, a, isz, line)
            assert aligned <= now + 1e-12
            if previous is not None:
                assert now <= previous + 1e-12
            previous = now


def test_more_bytes_are_never_cheaper():
    p = PROFILES["h100"]
    for flops in (0, 1e9, 1e13):
        for dram in (0, 1e6, 1e9):
            for extra in (1, 1e5, 1e8):
                base = roofline(flops, dram, 1e6, p, "float32")
                assert roofline(flops, dram + extra, 1e6, p, "float32") >= base
                assert roofline(flops, dram, 1e6 + extra, p, "float32") >= base
    rng = random.Random(2)
    for _ in range(50):
        lay = random_layout(rng)
        cheap = geometry(lay, "linear", "float32", p, memory_size=lay.window_size, memory_itemsize=4,
                         run_overhead_bytes=0)
        dear = geometry(lay, "linear", "float32", p, memory_size=lay.window_size, memory_itemsize=4,
                        run_overhead_bytes=64)
        for t in TOKENS:
            assert predicted_time(dear, p, t) >= predicted_time(cheap, p, t)


def test_aligned_site_never_slower_than_unaligned():
    rng = random.Random(3)
    for name in ("h100", "l4", "cpu-avx2"):
        p = PROFILES[name]
        for _ in range(40):
            lay = random_layout(rng)
            aligned = dataclasses.replace(lay, alignment=p.alignment_elements(4))
            for mode in ("infer", "train"):
                for t in TOKENS:
                    ga = geometry(aligned, "linear", "float32", p, memory_size=lay.window_size, memory_itemsize=4)
                    gu = geometry(lay, "linear", "float32", p, memory_size=lay.window_size, memory_itemsize=4)
                    assert predicted_time(ga, p, t, mode) <= predicted_time(gu, p, t, mode) * (1 + 1e-12)


def test_larger_l2_is_never_worse():
    rng = random.Random(4)
    for name in PROFILES:
        p = PROFILES[name]
        for _ in range(20):
            lay = random_layout(rng, memory=rng.choice([10_000, 10**6, 10**8]))
            op = rng.choice(["linear", "embedding"])
            for factor in (2, 16, 1024):
                big = dataclasses.replace(p, l2_bytes=p.l2_bytes * factor)
                for t in TOKENS:
                    for mode in ("infer", "train"):
                        small_t = predicted_time(geometry(lay, op, "float32", p, memory_size=lay.window_size,
                                                          memory_itemsize=4), p, t, mode)
                        big_t = predicted_time(geometry(lay, op, "float32", big, memory_size=lay.window_size,
                                                        memory_itemsize=4), big, t, mode)
                        assert big_t <= small_t * (1 + 1e-12)


def test_time_grows_with_tokens_and_sympy_matches_numbers():
    p = PROFILES["a100"]
    lay = Layout(4096, 1000, 32, 32, 32, 0, 500_000)
    for op in ("linear", "embedding"):
        g = geometry(lay, op, "float32", p, memory_size=500_000, memory_itemsize=4)
        sym = symbolic_costs(g, p)
        assert sym["t_forward"].free_symbols <= {T}
        times = [predicted_time(g, p, t, "train") for t in TOKENS]
        assert times == sorted(times)
        for t in TOKENS:
            num = costs(g, p, t)
            for key in ("flops", "dram_bytes", "t_forward", "t_train"):
                assert float(sym[key].subs(T, t)) == pytest.approx(float(num[key]), rel=1e-9)


def test_roofline_is_compute_bound_for_many_tokens_on_a_gpu():
    p = PROFILES["h100"]
    g = geometry(Layout(8192, 8192, 32, 32, 32, 0, 10**7), "linear", "float32", p, memory_size=10**7,
                 memory_itemsize=4)
    big = costs(g, p, 8192)
    assert big["t_forward"] == big["t_compute"] == pytest.approx(2 * 8192**3 / (p.peak("float32") * 1e12))
    one = costs(g, p, 1)
    assert one["t_forward"] == pytest.approx(memory_time(one["dram_bytes"], one["l2_bytes"], p))


def test_float32_compute_follows_torch_matmul_precision_as_the_kernels_do():
    """"highest" (torch's default): the kernels' dot runs on FMA units, so the float32 peak; "high": TF32
    tensor cores, so the tf32 peak (codegen.triton_matmul.dot_precision makes the same choice)."""
    from roastfx.codegen.triton_matmul import dot_precision

    p = PROFILES["h100"]
    layout = Layout(8192, 8192, 32, 32, 32, 0, 10**7)
    before = torch.get_float32_matmul_precision()
    try:
        for precision, cdtype, kernel_precision in (("highest", "float32", "ieee"), ("high", "tf32", "tf32")):
            torch.set_float32_matmul_precision(precision)
            g = geometry(layout, "linear", "float32", p, memory_size=10**7, memory_itemsize=4)
            assert g.compute_dtype == cdtype and dot_precision(torch.float32) == kernel_precision
            assert costs(g, p, 8192)["t_compute"] == pytest.approx(2 * 8192**3 / (p.peak(cdtype) * 1e12))
    finally:
        torch.set_float32_matmul_precision(before)
    bf16 = geometry(layout, "linear", "bfloat16", p, memory_size=10**7, memory_itemsize=2)
    assert bf16.compute_dtype == "bfloat16"


def small_plan(memory, profile="h100", seed=0, shapes=((100, 70), (33, 129), (256, 64)), scheme="roast"):
    specs = specs_of(shapes)
    return plan_with_cost_model(specs, memory, {s.name: 0.1 for s in specs}, profile, seed, scheme=scheme)


def test_tile_level_slot_load_equals_the_element_reference():
    for memory, profile in ((5000, "h100"), (40_000, "cpu-avx2"), (1200, "l4")):
        plan = small_plan(memory, profile)
        mappings = [s.mapping for s in plan.sites]
        assert torch.equal(slot_load_by_tiles(mappings, memory), slot_load(mappings, memory))


@pytest.mark.parametrize("memory,profile,shapes", [
    (30_000, "cpu-avx2", ((300, 200), (500, 120), (64, 400), (250, 250))),
    (300_000, "h100", ((3000, 200), (500, 1200), (640, 400), (250, 250))),
    (3_000, "h100", ((300, 200), (50, 120), (64, 400), (250, 250))),
])
def test_analytic_collisions_match_the_counted_ones(memory, profile, shapes):
    plan = small_plan(memory, profile, shapes=shapes)
    mappings = [s.mapping for s in plan.sites]
    load = slot_load(mappings, plan.memory_size)
    predicted = expected_collisions(mappings)
    for m, pred in zip(mappings, predicted):
        index, _ = m.full_index()
        measured = float((load[index] - 1).double().mean())
        # the model assumes independent tile offsets; the linear hash spreads a site's tiles
        # a little more evenly, so counted collisions run up to ~15% lower
        assert 0.8 * pred <= measured <= 1.05 * pred
    stats = analytic_load(mappings, plan.memory_size)
    assert stats["mean"] == pytest.approx(float(load.double().mean()))
    assert 0.6 * stats["std"] <= float(load.double().std()) <= 1.1 * stats["std"]


def assert_valid(plan, memory):
    assert plan.memory_size == memory
    for s in plan.sites:
        m = s.mapping
        assert m.span <= m.window_size
        assert m.window_start % m.alignment == 0
        assert m.window_start + m.window_size <= memory
        assert positions(m) >= min(MIN_POSITIONS, m.window_size)  # a window under 64 slots cannot have 64


@pytest.mark.parametrize("scheme", ["roast", "roast-local"])
@pytest.mark.parametrize("profile", ["h100", "cpu-avx2", "cpu-neon"])
def test_planner_tiles_are_valid_and_the_budget_is_kept(profile, scheme):
    for memory in (20_000, 100_000, 3_000_000):
        plan = small_plan(memory, profile, scheme=scheme, shapes=((100, 70), (33, 129), (256, 64), (2000, 3000)))
        assert_valid(plan, memory)
        assert plan.target == profile and plan.scheme == scheme


def test_planner_is_deterministic_and_uses_the_seed_like_plan_layout():
    a, b = small_plan(50_000, seed=3), small_plan(50_000, seed=3)
    assert a == b and a.to_json() == b.to_json()
    c = small_plan(50_000, seed=4)
    assert [s.mapping.b for s in a.sites] != [s.mapping.b for s in c.sites]
    specs = specs_of(((100, 70), (33, 129), (256, 64)))
    default = plan_layout(specs, 50_000, {s.name: 0.1 for s in specs}, seed=3, cache_line=32)
    for x, y in zip(a.sites, default.sites):
        assert (x.mapping.a_row, x.mapping.a_col, x.mapping.b, x.mapping.d) == (
            y.mapping.a_row, y.mapping.a_col, y.mapping.b, y.mapping.d)


def test_planner_aligns_whole_line_tiles_to_whole_cache_lines_when_the_memory_allows():
    for profile, line in (("h100", 32), ("cpu-avx2", 16)):
        plan = small_plan(1_000_000, profile, shapes=((1024, 768), (256, 64), (4096, 512)))
        for s in plan.sites:
            m = s.mapping
            assert m.rows % m.tile_rows == 0 and m.cols % m.tile_cols == 0  # these shapes allow full tiles
            assert m.span % line == 0 and m.alignment == line


def test_planner_never_predicts_slower_than_the_default_rules():
    p = PROFILES["h100"]
    specs = specs_of(((1000, 700), (333, 129), (2560, 640)))
    scales = {s.name: 0.1 for s in specs}
    for memory in (30_000, 400_000):
        ours = plan_with_cost_model(specs, memory, scales, p)
        rules = plan_layout(specs, memory, scales, cache_line=32)
        for x, y in zip(ours.sites, rules.sites):
            gx = geometry(x.mapping, x.op, x.dtype, p, memory_size=memory, memory_itemsize=4)
            gy = geometry(y.mapping, y.op, y.dtype, p, memory_size=memory, memory_itemsize=4)
            for t in (1, 16, 256, 4096):
                assert predicted_time(gx, p, t) <= predicted_time(gy, p, t) * 1.01


def test_planning_a_billion_parameter_model_takes_seconds():
    shapes = [(8192, 8192), (8192, 8192), (8192, 8192), (8192, 8192)] * 4  # 16 x 67M = 1.07e9
    specs = specs_of(shapes) + [SiteSpec("emb.weight", ("emb.weight",), (32000, 4096), "embedding", False,
                                         "float32")]
    memory = sum(math.prod(s.shape) for s in specs) // 100
    start = time.perf_counter()
    plan = plan_with_cost_model(specs, memory, {s.name: 0.01 for s in specs}, "h100", mode="train")
    assert time.perf_counter() - start < 10
    assert_valid(plan, memory)
    assert plan.dense_numel > 10**9


def test_execution_graph_follows_the_order():
    specs = specs_of(((4, 4), (8, 8), (16, 16)))
    g = execution_graph(specs)
    assert list(g.edges) == [("s0.weight", "s1.weight"), ("s1.weight", "s2.weight")]
    g = execution_graph(specs, order=["s2.weight", "s0.weight"])
    assert ("s2.weight", "s0.weight") in g.edges and "s1.weight" in g.nodes
    with pytest.raises(ValueError, match="unknown sites"):
        execution_graph(specs, order=["nope"])


def test_planner_errors_name_the_bad_value():
    specs = specs_of(((100, 70),))
    with pytest.raises(ValueError, match="mode='fast'"):
        plan_with_cost_model(specs, 10_000, {"s0.weight": 1.0}, "h100", mode="fast")
    with pytest.raises(ValueError, match="unknown target"):
        plan_with_cost_model(specs, 10_000, {"s0.weight": 1.0}, "z80")
    with pytest.raises(ValueError, match="token_counts"):
        plan_with_cost_model(specs, 10_000, {"s0.weight": 1.0}, "h100", token_counts=(0,))
    with pytest.raises(ValueError, match="no scale"):
        plan_with_cost_model(specs, 10_000, {}, "h100")
    with pytest.raises(ValueError, match="memory too small"):
        plan_with_cost_model(specs, 10_000, {"s0.weight": 1.0}, "h100", tile=(128, 128))


@pytest.mark.parametrize("planner", ["cost", "rules"])
def test_grouped_sites_get_tiles_whole_within_each_group(planner):
    """A stacked (experts, out, in) weight's view is (in, experts * out); its tiles' columns divide out (48 and
    40, not powers of two), so each expert reads as a mapping of its own (column_windows), on both planners."""
    from roastfx.codegen.ops import column_windows, mapping_args

    specs = [SiteSpec("up", ("up",), (8, 48, 64), "grouped", True, "bfloat16"),
             SiteSpec("down", ("down",), (8, 64, 40), "grouped", False, "bfloat16"),
             SiteSpec("head", ("head",), (100, 64), "linear", True, "bfloat16")]
    scales = {s.name: 0.1 for s in specs}
    for memory in (2_000, 60_000):
        plan = (plan_with_cost_model(specs, memory, scales, "h100", mode="train") if planner == "cost"
                else plan_layout(specs, memory, scales, cache_line=32))
        up, down = plan.sites[0].mapping, plan.sites[1].mapping
        assert (up.rows, up.cols, down.rows, down.cols) == (64, 8 * 48, 64, 8 * 40)
        assert 48 % up.tile_cols == 0 and 40 % down.tile_cols == 0
        assert all(column_windows(mapping_args(m), 8) is not None for m in (up, down))


def test_a_grouped_site_costs_one_group_per_token():
    """Each token multiplies one expert: the FLOPs of a (K, E * N) grouped view are those of a (K, N) GEMM, and
    the weight bytes those of the whole view (every expert is read once)."""
    p = PROFILES["h100"]
    lay = Layout(512, 8 * 256, 32, 32, 32, 0, 200_000)
    grouped = geometry(lay, "grouped", "bfloat16", p, memory_size=200_000, memory_itemsize=2, groups=8)
    one = geometry(Layout(512, 256, 32, 32, 32, 0, 200_000), "linear", "bfloat16", p, memory_size=200_000,
                   memory_itemsize=2)
    whole = geometry(lay, "linear", "bfloat16", p, memory_size=200_000, memory_itemsize=2)
    for tokens in (16, 4096):
        c, c1, cw = costs(grouped, p, tokens), costs(one, p, tokens), costs(whole, p, tokens)
        assert c["flops"] == c1["flops"] == cw["flops"] / 8
        assert c["dram_bytes"] + c["l2_bytes"] >= grouped.weight_bytes == whole.weight_bytes
        assert predicted_time(grouped, p, tokens) <= predicted_time(whole, p, tokens)
