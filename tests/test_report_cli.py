import html.parser
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import roastfx
from roastfx.cli import main
from roastfx.passes.capture_sites import SiteSpec
from roastfx.passes.plan_cost import plan_with_cost_model
from roastfx.report import REPORT_FORMAT, analyze, plan_from_json, plan_html, plan_report, plan_to_json

HERE = os.path.dirname(__file__)


def make_plan(memory=6000, profile="h100"):
    specs = [
        SiteSpec("emb.weight", ("emb.weight", "head.weight"), (100, 32), "embedding", False, "float32"),
        SiteSpec("blocks.0.fc.weight", ("blocks.0.fc.weight",), (64, 32), "linear", True, "float32"),
        SiteSpec("blocks.1.fc.weight", ("blocks.1.fc.weight",), (32, 64), "linear", True, "float32"),
        SiteSpec("conv.weight", ("conv.weight",), (16, 8, 3, 3), "conv", True, "float32"),
    ]
    return plan_with_cost_model(specs, memory, {s.name: 0.05 for s in specs}, profile, seed=7)


class TextCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_table_names_every_site_and_the_totals():
    plan = make_plan()
    text = plan_report(plan)
    for s in plan.sites:
        assert s.name in text
    assert "10.0x smaller" not in text  # the memory here is not a round 10x
    assert "compressed" in text and "predicted on h100" in text and "x smaller" in text


def test_plain_table_without_rich(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.table", None)
    plan = make_plan()
    text = plan_report(plan, "cpu-avx2")
    assert "┃" not in text and all(s.name in text for s in plan.sites) and "predicted on cpu-avx2" in text


def test_report_figures_are_consistent():
    plan = make_plan()
    rep = analyze(plan, tokens=256)
    t = rep["totals"]
    assert t["dense_bytes"] == plan.dense_numel * 4 and t["compressed_bytes"] == plan.memory_size * 4
    assert t["ratio"] == pytest.approx(plan.ratio)
    assert sum(s["memory_share"] for s in rep["sites"]) == pytest.approx(1.0)
    assert t["slot_load"]["source"] == "exact" and sum(t["slot_load"]["histogram"]) == plan.memory_size
    fc = next(s for s in rep["sites"] if s["name"] == "blocks.0.fc.weight")
    assert fc["flops"] == 2 * 256 * 64 * 32 and "T" in fc["forward_s_of_T"]


def test_json_round_trip_and_versioning():
    plan = make_plan()
    text = plan_to_json(plan, "l4")
    doc = json.loads(text)
    assert doc["format"] == REPORT_FORMAT and doc["report_version"] == 1
    assert doc["plan"]["schema_version"] == 1 and doc["report"]["profile"] == "l4"
    assert [s["name"] for s in doc["report"]["sites"]] == [s.name for s in plan.sites]
    assert plan_from_json(text) == plan
    assert plan_from_json(plan.to_json()) == plan
    assert plan_to_json(plan, "l4") == text  # stable
    doc["report_version"] = 99
    with pytest.raises(ValueError, match="report_version 99"):
        plan_from_json(json.dumps(doc))


def test_html_is_self_contained_parses_and_names_every_site():
    plan = make_plan()
    page = plan_html(plan)
    parser = TextCollector()
    parser.feed(page)
    parser.close()
    text = "".join(parser.text)
    for s in plan.sites:
        assert s.name in text
    tags = [t for t, _ in parser.tags]
    assert tags.count("svg") == 3 and "table" in tags
    assert not any(a.get("src", "").startswith("http") or a.get("href", "").startswith("http")
                   for _, a in parser.tags)
    assert "predicted" in text


def test_html_of_a_large_plan_uses_the_analytic_load():
    specs = [SiteSpec(f"l{i}.weight", (f"l{i}.weight",), (8192, 8192), "linear", True, "float32") for i in range(24)]
    memory = 24 * 8192 * 8192 // 10
    plan = plan_with_cost_model(specs, memory, {s.name: 0.01 for s in specs}, "h100")
    page = plan_html(plan)
    assert "analytic" in page and all(s.name in page for s in plan.sites)


# -- CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture
def models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(HERE)


def test_cli_plan_table_json_html(models_on_path, capsys, tmp_path):
    assert main(["plan", "cli_models:small_mlp", "--compression", "10x", "--target", "h100"]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "4.weight" in out and "target=h100" in out
    target = tmp_path / "plan.json"
    assert main(["plan", "cli_models:small_mlp", "--compression", "0.1", "--target", "a100", "--format", "json",
                 "--out", str(target)]) == 0
    plan = plan_from_json(target.read_text())
    assert plan.target == "a100" and len(plan.sites) == 3
    dense = sum(p.numel() for n, p in __import__("cli_models").small_mlp().named_parameters() if n.endswith("weight"))
    assert plan.memory_size == -(-dense // 10)
    page = tmp_path / "plan.html"
    assert main(["plan", "cli_models:tiny_lm", "--target", "l4", "--format", "html", "--out", str(page),
                 "--meta", "--no-progress"]) == 0
    assert "41.weight" in page.read_text()


def test_cli_plans_what_the_library_planner_plans(models_on_path, capsys, tmp_path):
    import cli_models
    from roastfx.compress import _site_scale
    from roastfx.passes.capture_sites import find_sites

    torch.manual_seed(0)
    model = cli_models.small_mlp()
    specs, _ = find_sites(model)
    params = dict(model.named_parameters())
    scales = {s.name: _site_scale(params[s.name]) for s in specs}
    memory = -(-sum(params[s.name].numel() for s in specs) // 50)
    expected = plan_with_cost_model(specs, memory, scales, "rtx4090", seed=5)
    out = tmp_path / "p.json"
    torch.manual_seed(0)
    assert main(["plan", "cli_models:small_mlp", "--compression", "50x", "--target", "rtx4090", "--seed", "5",
                 "--format", "json", "--out", str(out)]) == 0
    assert plan_from_json(out.read_text()).sites == expected.sites


def test_cli_target_from_environment(models_on_path, capsys, monkeypatch):
    monkeypatch.setenv("ROASTFX_TARGET", "cpu-neon")
    assert main(["plan", "cli_models:small_mlp", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["target"] == "cpu-neon"


@pytest.mark.parametrize("argv,message", [
    (["plan", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
    (["plan", "cli_models"], "MODULE:FACTORY"),
    (["plan", "cli_models:missing"], "has no attribute 'missing'"),
    (["plan", "cli_models:NOT_CALLABLE"], "not a callable"),
    (["plan", "cli_models:not_a_model"], "not an nn.Module"),
    (["plan", "cli_models:no_sites"], "nothing to plan"),
    (["plan", "cli_models:small_mlp", "--compression", "hundred"], "compression='hundred'"),
    (["plan", "cli_models:small_mlp", "--compression", "0.5x"], "must be >= 1x"),
    (["plan", "cli_models:small_mlp", "--target", "tpu"], "unknown target 'tpu'"),
    (["plan", "cli_models:small_mlp", "--format", "pdf"], "--format 'pdf'"),
    (["plan", "cli_models:small_mlp", "--tokens", "0,5"], "--tokens"),
    (["plan", "cli_models:small_moe", "--inputs", "cli_models"], "--inputs 'cli_models' is not of the form MODULE:F"),
    (["plan", "cli_models:small_moe", "--inputs", "cli_models:nope"], "no attribute 'nope' (inputs 'cli_models:nope')"),
    (["plan", "cli_models:small_moe", "--inputs", "cli_models:inputs_raise"],
     "inputs 'cli_models:inputs_raise' raised RuntimeError: no inputs today"),
    (["inspect", "/no/such/file.safetensors"], "does not exist"),
    (["launch"], "invalid choice"),
    ([], "a command is required"),
])
def test_bad_arguments_exit_2_with_one_line(models_on_path, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("roastfx: error: ") and message in err


def test_cli_targets_lists_every_profile(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in roastfx.PROFILES:
        assert name in out


def test_cli_inspect_a_checkpoint(capsys, tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    roastfx.compress(model, compression="4x", target="cpu-avx2")
    path = tmp_path / "m.safetensors"
    roastfx.save(model, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "memory:" in out
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    assert main(["inspect", str(bogus)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_end_to_end_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("ROASTFX_TARGET", None)
    ok = subprocess.run([sys.executable, "-m", "roastfx.cli", "plan", "cli_models:tiny_lm", "--compression", "20x",
                         "--target", "h200", "--format", "json"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["plan"]["target"] == "h200" and len(doc["plan"]["sites"]) == 42
    bad = subprocess.run([sys.executable, "-m", "roastfx.cli", "plan", "cli_models:small_mlp", "--target", "nope"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown target 'nope'" in bad.stderr


# -- bad input from the user's code or roastfx's checks: one line, exit 2, in a real process ------------------
def run_cli(*argv, extra_path=(), env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, *map(str, extra_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("ROASTFX_TARGET", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "roastfx.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def assert_one_line_usage_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("roastfx: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("argv,fragments", [
    (["cli_models:raises"], ["factory 'cli_models:raises' raised RuntimeError: boom in the factory", "--traceback"]),
    (["cli_models:raises_type_error"], ["factory 'cli_models:raises_type_error' raised TypeError: "]),
    (["cli_models:needs_width"], ["factory 'cli_models:needs_width' needs the argument(s) width;"]),
    (["cli_models:small_mlp", "--exclude", "zzz*"], ["exclude patterns ['zzz*'] match no compressible weight",
                                                      "'0.weight'"]),
    (["cli_models:small_mlp", "--compression", "10000x", "--scheme", "roast-local"],
     ["memory of 2 slots cannot give 3 sites a region each under scheme 'roast-local'"]),
    (["cli_models:empty_weight", "--compression", "2x"], ["site '0.weight' has shape (5, 0): an empty weight"]),
    (["cli_models:empty_weight", "--compression", "2x", "--planner", "default"],
     ["site '0.weight' has shape (5, 0): an empty weight"]),
    (["cli_models:small_mlp", "--seed", "-1"], ["--seed -1 must be a non-negative int"]),
])
def test_cli_plan_errors_are_one_line_exit_2(argv, fragments):
    assert_one_line_usage_error(run_cli("plan", *argv), *fragments)


def test_cli_module_that_fails_to_import_is_one_line_exit_2(tmp_path):
    (tmp_path / "broken_syntax_models.py").write_text("from torch import nn\ndef build(:\n    return nn.Linear(4, 4)\n")
    (tmp_path / "raising_models.py").write_text("raise ValueError('no config file here')\ndef build(): pass\n")
    assert_one_line_usage_error(run_cli("plan", "broken_syntax_models:build", extra_path=[tmp_path]),
                                "importing module 'broken_syntax_models' of factory 'broken_syntax_models:build' "
                                "raised SyntaxError")
    assert_one_line_usage_error(run_cli("plan", "raising_models:build", extra_path=[tmp_path]),
                                "importing module 'raising_models' of factory 'raising_models:build' raised "
                                "ValueError: no config file here")


def test_cli_traceback_option_shows_where_the_factory_failed(tmp_path):
    (tmp_path / "raising_models.py").write_text("raise ValueError('no config file here')\ndef build(): pass\n")
    proc = run_cli("plan", "cli_models:raises", "--traceback")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert 'raise RuntimeError("boom in the factory")' in proc.stderr
    proc = run_cli("plan", "raising_models:build", "--traceback", extra_path=[tmp_path])
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "raising_models.py" in proc.stderr


def test_cli_unknown_target_from_the_environment_names_the_variable():
    proc = run_cli("plan", "cli_models:small_mlp", env_extra={"ROASTFX_TARGET": "h10"})
    assert_one_line_usage_error(proc, "unknown target 'h10' (set by the environment variable ROASTFX_TARGET)",
                                "known targets: ", "h100")


def test_internal_errors_other_than_value_errors_are_not_swallowed(models_on_path, monkeypatch):
    import roastfx.passes.capture_sites as capture_sites

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(capture_sites, "find_sites", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["plan", "cli_models:small_mlp", "--target", "h100"])


# -- user text in the terminal table ------------------------------------------------------------------------
MARKUP_NAMES = ("[bold]enc.weight", "dec[/].weight", ":smile:.weight", "[red].weight")


def test_table_prints_site_names_and_notes_as_written():
    specs = [SiteSpec(n, (n,), (64, 32), "linear", True, "float32") for n in MARKUP_NAMES]
    plan = plan_with_cost_model(specs, 800, {s.name: 0.05 for s in specs}, "h100", seed=1,
                                notes=["excluded 1 weights matching ['[italic]*', ':smile:*']"])
    text = plan_report(plan)
    for name in MARKUP_NAMES:
        assert name in text
    assert "excluded 1 weights matching ['[italic]*', ':smile:*']" in text
    assert "\U0001f604" not in text  # rich's :smile: emoji


def test_cli_table_of_markup_names_end_to_end():
    proc = run_cli("plan", "cli_models:markup_names", "--target", "h100", "--compression", "10x",
                   "--exclude", "[[]red]*")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for name in MARKUP_NAMES[:3]:
        assert f"│ {name} " in proc.stdout
    assert "[red].weight" not in proc.stdout and "excluded 1 weights matching ['[[]red]*']" in proc.stdout


# -- --meta scales follow each module kind's default init ------------------------------------------------------
def meta_scales(models_arg, capsys, *extra):
    assert main(["plan", models_arg, "--meta", "--format", "json", "--compression", "10x", "--target", "h100",
                 "--no-progress", *extra]) == 0
    return {s["name"]: s["scale"] for s in json.loads(capsys.readouterr().out)["plan"]["sites"]}


def test_meta_scales_match_the_std_of_a_real_default_init(models_on_path, capsys):
    import cli_models

    scales = meta_scales("cli_models:init_kinds", capsys)
    torch.manual_seed(0)
    real = cli_models.init_kinds()
    weights = {n: p for n, p in real.named_parameters() if "bias" not in n}
    assert set(scales) == set(weights)  # every weight of every kind is a site
    for name, p in weights.items():
        std = float(p.detach().double().std())
        assert scales[name] == pytest.approx(std, rel=0.03), name
    # the kinds really differ: one fan-in rule for all would be off by far more than the tolerance
    assert scales["emb.weight"] == pytest.approx(1.0, rel=0.03)
    assert scales["lstm.weight_ih_l0"] == pytest.approx(1 / (3 * 128) ** 0.5, rel=1e-9)
    assert scales["mha.in_proj_weight"] == pytest.approx((2 / (192 + 3 * 192)) ** 0.5, rel=1e-9)


def test_meta_scales_of_transformers_conv1d(models_on_path, capsys):
    pytest.importorskip("transformers")
    import cli_models

    scales = meta_scales("cli_models:gpt2_conv1d", capsys)
    torch.manual_seed(0)
    for name, p in cli_models.gpt2_conv1d().named_parameters():
        if name.endswith("weight"):
            assert scales[name] == pytest.approx(float(p.detach().double().std()), rel=0.03), name


# -- memory bytes in the memory's dtype -----------------------------------------------------------------------
@pytest.mark.parametrize("memory_dtype,slot_bytes", [("bfloat16", 2), ("float32", 4)])
def test_summary_and_inspect_count_bytes_in_the_memory_dtype(tmp_path, memory_dtype, slot_bytes):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))  # 640 float32 weights: 2,560 B dense
    roastfx.compress(model, compression="4x", target="cpu-avx2", memory_dtype=memory_dtype)
    plan = roastfx.roast_state(model).plan
    assert plan.memory_dtype == memory_dtype and plan.memory_size == 160
    expected = f"memory of 160 {memory_dtype} slots (4.0x fewer elements; 2.6 KB -> {160 * slot_bytes} B"
    assert expected in plan.summary()
    path = tmp_path / "m.safetensors"
    roastfx.save(model, path)
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout and f"{2560 / (160 * slot_bytes):.1f}x smaller" in proc.stdout


class TiedLM(nn.Module):
    def __init__(self, vocab=300, dim=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_tied_weight_is_costed_for_every_op_that_reads_it(tmp_path):
    """A tied embedding + lm_head is one site read by two ops: the report counts the head's GEMM (2*T*vocab*dim
    FLOPs) besides the lookup, the plan records the second reader and keeps it through JSON and checkpoints."""
    from roastfx.passes.capture_sites import find_sites

    model = TiedLM()
    specs, _ = find_sites(model)
    tied = next(s for s in specs if s.name == "emb.weight")
    assert tied.op == "embedding" and tied.other_ops == ("linear",)
    assert next(s for s in specs if s.name == "fc.weight").other_ops == ()
    roastfx.compress(model, "4x", target="h100", planner="cost")
    plan = roastfx.roast_state(model).plan
    assert plan.site("emb.weight").ops == ("embedding", "linear")
    tokens = 256
    report = analyze(plan, "h100", tokens)
    row = next(s for s in report["sites"] if s["name"] == "emb.weight")
    assert row["op"] == "embedding+linear"
    assert row["flops"] == 2 * tokens * 300 * 48  # the lookup does none
    assert report["totals"]["flops"] == 2 * tokens * 300 * 48 + 2 * tokens * 48 * 48
    assert roastfx.Plan.from_json(plan.to_json()) == plan
    roastfx.save(model, tmp_path / "m.safetensors")
    assert roastfx.read_plan(tmp_path / "m.safetensors") == plan
    old = json.loads(plan.to_json())  # a plan written before the field: read as no other readers
    for site in old["sites"]:
        del site["other_ops"]
    assert roastfx.Plan.from_dict(old).site("emb.weight").other_ops == ()


@pytest.mark.parametrize("meta", [False, True])
def test_cli_inputs_find_functional_and_grouped_weights(models_on_path, capsys, meta):
    """--inputs traces the model on example inputs, as compress(example_inputs=...) does: the router (F.linear on
    a plain Parameter) and the stacked experts (grouped sites, (in, experts * out) views) join the plan; without
    it a model of plain Parameters has nothing to plan. On the meta device too, where the experts' scale is
    1/sqrt(3 * in), their fan-in."""
    extra = ["--meta"] if meta else []
    assert main(["plan", "cli_models:small_moe", "--inputs", "cli_models:moe_inputs", "--format", "json",
                 "--target", "h100", "--compression", "10x", *extra]) == 0
    plan = plan_from_json(capsys.readouterr().out)
    sites = {s.name: s for s in plan.sites}
    assert {n: (s.op, s.transposed) for n, s in sites.items()} == {
        "router": ("linear", True), "up": ("grouped", True), "down": ("grouped", True)}
    assert (sites["up"].mapping.rows, sites["up"].mapping.cols) == (32, 4 * 64)
    assert any("traced the model" in n for n in plan.notes)
    if meta:
        assert sites["up"].scale == pytest.approx(1 / math.sqrt(3 * 32))
        assert sites["down"].scale == pytest.approx(1 / math.sqrt(3 * 64))
    assert main(["plan", "cli_models:small_moe", "--target", "h100", *extra]) == 2
    assert "nothing to plan" in capsys.readouterr().err

