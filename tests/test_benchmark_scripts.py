"""The GPU benchmark scripts run end to end on CPU (--dry-run, Triton interpreter) and their statistics are right.

Their numbers on CPU mean nothing (the interpreter); these tests keep the scripts working
for the sessions that get a GPU, where they write benchmarks/results/.
"""
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.parametrize("script,args,expect", [
    ("bench_kernels.py", ["--dry-run", "--compression", "10"], ["roast", "hashednet", "eager"]),
    ("validate_cost_model.py", ["--dry-run", "--compression", "20", "--layouts", "2"],
     ["planner", "default", "spearman", "median |log2 error|"]),
    ("bench_conv.py", ["--dry-run", "--compression", "10"], ["dense", "implicit", "im2col", "vs dense fwd"]),
    ("bench_models.py", ["--dry-run", "--compression", "100", "--steps", "1", "--warmup", "1"],
     ["bert-tiny", "gpt2-tiny", "dense-compile", "roast-100x", "train x"]),
    ("sweep_configs.py", ["--dry-run"], ["*32x32x32 w1 s1", "blk/SM", "x dense"]),
    ("bench_moe.py", ["--dry-run"], ["tiny", "dense", "roast", "roast-mat", "dense-picked", "roast-picked"]),
])
def test_benchmark_dry_run(script, args, expect):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING" not in done.stderr, done.stderr[-2000:]  # the scripts' checks of the fused kernels' results
    for word in expect:
        assert word in done.stdout, (word, done.stdout[-2000:])


def test_blocks_per_sm_takes_the_tightest_resource():
    from types import SimpleNamespace

    from sweep_configs import blocks_per_sm

    h100 = SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472)
    # 127 registers round up to 128 per thread (256 per warp): two blocks of 8 warps fill the register file
    assert blocks_per_sm(127, 96 * 1024, 8, h100) == 2
    assert blocks_per_sm(129, 96 * 1024, 8, h100) == 1  # one register more: 136 per thread, 1 block
    assert blocks_per_sm(64, 120 * 1024, 4, h100) == 1  # shared memory: 2 x 121 KiB > 228 KiB
    assert blocks_per_sm(32, 0, 4, h100) == 16  # threads: 2,048 per SM / 128
    assert blocks_per_sm(None, 1024, 4, h100) is None


def test_bad_benchmark_arguments_exit_2():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "validate_cost_model.py"),
                           "--shapes", "nope"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown shape(s) ['nope']" in done.stderr


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr
    from validate_cost_model import spearman

    rng = random.Random(5)
    for n in (3, 7, 20):
        a = [rng.random() for _ in range(n)]
        b = [x + rng.gauss(0, 0.3) for x in a]
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_summary_compares_planner_and_default_on_measured_time():
    from validate_cost_model import summarize

    def row(layout, pred, meas):
        return dict(shape="s", compression=10.0, layout=layout, predicted_ms={"infer": pred, "train": 2 * pred},
                    measured_ms={"infer": meas, "train": 2 * meas})

    rows = [row("planner", 1.0, 3.0), row("default", 2.0, 6.0), row("candidate", 4.0, 12.0)]
    s = summarize(rows)
    infer = next(g for g in s["groups"] if g["mode"] == "infer")
    assert infer["planner_speedup_over_default"] == pytest.approx(2.0)
    assert infer["spearman"] == pytest.approx(1.0)
    assert s["fitted_scale"]["infer"] == pytest.approx(3.0) and s["median_abs_log2_error"]["infer"] < 1e-12


def test_compile_check_compiles_every_kernel_kind_for_h100_without_a_gpu(tmp_path):
    """ptxas from the Triton wheel compiles each kernel for sm_90 on this CPU machine; nothing runs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--target", "h100",
                           "--quick", "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " 0 failure(s)" in done.stdout
    import json

    (path,) = tmp_path.glob("compile-h100-*.json")
    result = json.loads(path.read_text())
    kernels = {r["kernel"] for r in result["launches"]}
    for name in ("roast_matmul_kernel", "roast_grad_memory_kernel", "gather_rows_kernel", "scatter_rows_kernel",
                 "materialize_kernel", "roast_grouped_matmul_kernel", "roast_grouped_grad_memory_kernel"):
        assert name in kernels, kernels
    assert sum(k.startswith("roast_linear_epilogue_") for k in kernels) == 3
    # the plain conv (bias as a per-channel epilogue), ResNet's conv + batch norm + residual + relu and the
    # row-scaled conv1d's (its bias broadcast over a height of 1: another extra kind); the conv's dX (the
    # transposed-conv kernel with no epilogue step) and a transposed conv + bias + batch norm + relu; the
    # conv's dMemory
    assert sum(k.startswith("roast_conv_epilogue_") for k in kernels) == 3
    assert sum(k.startswith("roast_transposed_conv_epilogue_") for k in kernels) == 2
    assert "roast_conv_grad_memory_kernel" in kernels
    assert sum(k.startswith("roast_embedding_epilogue_") for k in kernels) == 1
    # the dense reference GEMM beside the forward at each config: its main loop has the same tensor-core
    # instructions and fewer instructions in all (no hashing, no signs)
    pairs = result["summary"]["forward_loop_vs_dense"]
    assert len(pairs) == 2 and all(0 < dense < roast for roast, dense in pairs.values()), pairs
    for r in result["launches"]:
        assert r["shared_bytes"] <= 227 * 1024 and r["registers"] and r["registers"] <= 255, r
        assert r["spill_bytes"] <= 16 and not r["loop_spill_ops"], r
        if r["config"] != "fixed":  # every bf16 GEMM runs on tensor cores (wgmma) ...
            assert r["tensor_core_ops"] > 0, r
            # ... fed by cp.async copies, except the conv's dMemory: both its operands are gathers of 2-byte
            # elements (x's im2col tile, dY by pixel), and cp.async moves at least 4 bytes (in fp32 it has them)
            assert (r["async_copies"] > 0) != (r["kernel"] == "roast_conv_grad_memory_kernel"), r


def test_compile_check_rejects_cpu_targets():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--target",
                           "cpu-avx2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "GPU profiles" in done.stderr


def test_compile_only_refuses_the_interpreter_and_bad_architectures(monkeypatch):
    from roastfx.codegen.aot import compile_only

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with compile_only(90):
            pass
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="'sm90'"):
        with compile_only("sm90"):
            pass


def test_cpu_benchmark_quick_run():
    """benchmarks/bench_cpu.py --quick: every case and method timed, ratios printed (no JSON written)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_cpu.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for word in ("embedding-tiny", "linear-tiny", "rows", "whole table", "eager", "custom op", "dense", "x"):
        assert word in done.stdout, (word, done.stdout)
    assert "wrote" not in done.stdout


def test_model_fuzz_runs_random_models_compiled_against_eager():
    """benchmarks/fuzz_models.py: random models (sequence and image) compressed, trained one step eagerly and
    compiled on both kernel paths, at two batch sizes; every case passes and the fused reads are counted."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fuzz_models.py"), "--cases", "3",
                           "--seed", "11", "--verbose"], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 cases (seed 11, cpu): 0 failed" in done.stdout, done.stdout[-2000:]
    assert done.stdout.count("ok   case") == 3 and " fused" in done.stdout, done.stdout[-2000:]


def test_model_fuzz_catches_a_wrong_fused_op(monkeypatch):
    """The fuzz's check can fail: with the backend's last fused op (the head) scaled by 1.01 (a wrong kernel), the same
    kind of case reports its output and gradients as different from eager's."""
    import fuzz_models
    import torch

    import roastfx.passes.fuse_roast_ops as fuse_pass

    original = fuse_pass.fuse_roast_ops

    def wrong(gm):
        uses = original(gm)
        node = next(n for n in gm.graph.nodes if n.name == next(u.node for u in reversed(uses) if u.fused))
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(torch.mul, (node, 1.01))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        gm.recompile()
        return uses

    monkeypatch.setattr(fuse_pass, "fuse_roast_ops", wrong)
    monkeypatch.setenv("ROASTFX_KERNELS", "reference")  # run_case sets it per case; restored after the test
    monkeypatch.setitem(fuzz_models.FORCE, "kernels", "reference")
    monkeypatch.setitem(fuzz_models.FORCE, "inner", "aot_eager")
    monkeypatch.setitem(fuzz_models.FORCE, "grad_scaling", "none")
    monkeypatch.setitem(fuzz_models.FORCE, "autocast", False)  # float32: a 1% error is far outside its tolerance
    result, note = fuzz_models.run_case(random.Random(5), 0, [])
    assert note is None and len(result) == 1 and isinstance(result[0], str), (result, note)
    assert "batch 1: output differs" in result[0] and "gradient of roast_memory differs" in result[0], result[0]
