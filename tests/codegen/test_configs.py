"""Block configs: the shared-memory estimate against compiled kernels, and the fallback when a
device refuses a config for resources."""
import glob
import json
import os

import pytest
from triton.runtime.errors import OutOfResources

from roastfx.codegen import configs
from roastfx.profiles import PROFILES

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")


def test_estimate_counts_the_memory_dtype_and_its_conversion():
    c = configs.BlockConfig(64, 128, 64, num_warps=4, num_stages=4)
    # bf16 activations, bf16 memory: the pipelined A and B tiles only
    assert c.shared_memory(2) == 4 * (64 * 64 + 64 * 128) * 2
    # an fp32 memory: B tiles in fp32, plus one B tile converted to bf16 for the dot
    assert c.shared_memory(2, 4) == 4 * (64 * 64 * 2 + 64 * 128 * 4) + 64 * 128 * 2


@pytest.mark.parametrize("target", ["h100", "a100", "l4"])
def test_no_config_the_estimate_keeps_overflows_a_compiled_kernel(target):
    """benchmarks/compile_check.py compiled every kernel with every block config for the target
    (ptxas, no GPU): each config configs.candidates keeps asked for no more shared memory than
    the target has, touched no local memory inside its main loop and spilled at most 16 bytes
    (a register or two stored once around the epilogue, where ptxas chose to), and every launch
    compiled."""
    files = sorted(glob.glob(os.path.join(RESULTS, f"compile-{target}-*.json")))
    assert files, f"no compile check results for {target} in benchmarks/results"
    limit = PROFILES[target].smem_per_block_bytes
    for path in files:  # one per Triton version checked (3.7.1 here; 3.6.0 is the GPU machines')
        with open(path) as f:
            result = json.load(f)
        assert result["environment"]["smem_per_block_bytes"] == limit
        assert not result["summary"]["failures"], path
        rows = [r for r in result["launches"] if r.get("kept_by_candidates")]
        assert len(rows) >= 20
        for r in rows:
            assert r["shared_bytes"] <= limit, (path, r)
            assert r["spill_bytes"] <= 16, (path, r)  # fp32 at "highest" precision too: the FMA configs
            assert not r["loop_spill_ops"], (path, r)
            assert r["estimate_bytes"] <= limit


def fake_launch(refuse):
    calls = []

    def launch(cfg):
        calls.append(cfg)
        if cfg in refuse:
            raise OutOfResources(300000, 232448, "shared memory")
        return f"ran {cfg.block_m}x{cfg.block_n}x{cfg.block_k}"

    return launch, calls


def test_a_refused_config_falls_back_and_is_never_offered_again(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # pick() chooses among real candidates
    monkeypatch.setattr(configs, "_refused", {})
    key = configs.refused_key("cuda:0", "test_kernel", "torch.bfloat16/torch.float32")

    def rechoose():
        return configs.pick(4096, 4096, 4096, PROFILES["h100"], 2, b_element_size=4,
                            exclude=configs.refused_configs().get(key, set()))

    first = rechoose()
    launch, calls = fake_launch(refuse={first})
    out = configs.run_fitting(launch, first, rechoose, key)
    assert calls[0] == first and calls[-1] != first and out.startswith("ran")
    assert configs.refused_configs() == {key: {first}}
    assert rechoose() == calls[-1]  # the refused config is not offered again


def test_an_explicit_config_or_another_error_is_raised_not_replaced(monkeypatch):
    monkeypatch.setattr(configs, "_refused", {})
    cfg = configs.CANDIDATES[0]
    launch, calls = fake_launch(refuse={cfg})
    with pytest.raises(OutOfResources):
        configs.run_fitting(launch, cfg, lambda: configs.CANDIDATES[1], ("k", "d", 0), explicit=True)
    assert calls == [cfg] and not configs.refused_configs()

    def broken(c):
        raise ValueError("not a resources problem")

    with pytest.raises(ValueError, match="not a resources"):
        configs.run_fitting(broken, cfg, lambda: configs.CANDIDATES[1], ("k", "d", 0))
    assert not configs.refused_configs()


def test_when_every_config_is_refused_the_error_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fitting = configs.candidates(PROFILES["h100"], 2)
    with pytest.raises(RuntimeError, match="every block config that fits was refused"):
        configs.pick(64, 64, 64, PROFILES["h100"], 2, exclude=set(fitting))


def test_full_precision_fp32_dots_get_the_fma_configs():
    fma = configs.candidates(PROFILES["h100"], 4, fma=True)
    assert fma == list(configs.FMA_CANDIDATES) and all(c.block_k == 16 for c in fma)
    assert not set(fma) & set(configs.candidates(PROFILES["h100"], 4))


def test_conv_kernels_choose_among_the_conv_configs(monkeypatch, device):
    """The three conv kernels ask configs.choose for CONV_CANDIDATES (the configs that spill nothing there);
    the plain GEMM does not."""
    import torch

    from roastfx.codegen import triton_conv, triton_matmul
    from test_kernels import random_mapping, random_memory

    assert configs.candidates(PROFILES["h100"], 2, conv=True) == list(configs.CONV_CANDIDATES)
    assert configs.candidates(PROFILES["h100"], 4, fma=True, conv=True) == list(configs.FMA_CONV_CANDIDATES)
    asked = {}
    choose = configs.choose

    def recording(*args, kernel=None, conv=False, **kwargs):
        asked[kernel] = conv
        return choose(*args, kernel=kernel, conv=conv, **kwargs)

    monkeypatch.setattr(configs, "choose", recording)
    mapping = random_mapping(2 * 4, 6, 4, 3, seed=1)
    memory = random_memory(mapping).float().to(device)
    x, g = torch.randn(1, 2, 5, 5, device=device), torch.randn(1, 6, 4, 4, device=device)
    triton_conv.roast_conv_forward(x, memory, mapping, 1.0, torch.empty_like(g), (2, 2), (1, 1), (0, 0), (1, 1))
    triton_conv.roast_conv_grad_input(g, memory, mapping, 1.0, torch.empty_like(x), (2, 2), (1, 1), (0, 0), (1, 1))
    triton_conv.roast_conv_grad_memory(x, g, memory.numel(), mapping, 1.0, (2, 2), (1, 1), (0, 0), (1, 1))
    triton_matmul.roast_matmul(torch.randn(3, 8, device=device), memory, mapping, 1.0, True)
    assert len(asked) == 4, asked
    assert {kernel.split("[")[0]: conv for kernel, conv in asked.items()} == {
        "roast_conv_epilogue": True, "roast_transposed_conv_epilogue": True, "roast_conv_grad_memory": True,
        "roast_matmul": False}
