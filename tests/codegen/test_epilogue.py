"""Generated epilogues: the IR, the kernel generated per pattern, the roast_linear_epilogue op,
and autotuning. Kernels run in the Triton interpreter on CPU (on CUDA with ROASTFX_TEST_CUDA=1);
every result is checked against float64 eager torch on the reference view."""
import ast

import pytest
import torch
import torch.nn.functional as F

from roastfx.codegen import configs, reference
from roastfx.codegen import triton_epilogue
from roastfx.codegen.epilogue import Epilogue, Step
from roastfx.codegen.epilogue_op import roast_linear_epilogue
from roastfx.codegen.ops import mapping_args
from roastfx.codegen.triton_epilogue import load_kernel, roast_matmul_epilogue
from roastfx.profiles import PROFILES
from test_kernels import random_mapping, random_memory, randn

M, K, N = 37, 45, 70


@pytest.fixture
def kernels(monkeypatch):
    """Route roast_linear_epilogue to the generated Triton kernel (on CPU: the interpreter)."""
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")


def site(seed=0, tiling=(5, 3, 1, 7)):
    mapping = random_mapping(K, N, *tiling, seed=seed)
    return mapping, random_memory(mapping, seed=seed)


def product64(x, memory, mapping, scale):
    """x @ V in float64, the independent reference for the GEMM part."""
    return x.double() @ reference.materialize(memory.double(), mapping, scale)


EXTRA_SHAPES = {"col": (N,), "full": (M, N), "row": (M, 1), "scalar": ()}


def extra(kind, seed, positive=False):
    t = randn(*(EXTRA_SHAPES[kind] or (1,)), seed=seed, dtype=torch.float64).reshape(EXTRA_SHAPES[kind])
    return t.abs() + 0.5 if positive else t


# one case per step kind; the leading sigmoid keeps rdiv's divisor away from 0
SINGLE_STEPS = [
    ("add:x0", ["col"]), ("add:x0", ["full"]), ("add:x0", ["scalar"]), ("add:-1.25", []),
    ("sub:x0", ["row"]), ("rsub:x0", ["full"]), ("rsub:2.0", []), ("sub:0.75", []),
    ("mul:x0", ["col"]), ("mul:-3.0", []), ("div:x0", ["full"]), ("div:7.0", []),
    ("sigmoid|rdiv:x0", ["col"]), ("sigmoid|rdiv:2.0", []),
    ("relu", []), ("gelu", []), ("gelu_tanh", []), ("silu", []), ("tanh", []), ("sigmoid", []),
    ("tanh|exp", []), ("erf", []),
]


@pytest.mark.parametrize("signature,kinds", SINGLE_STEPS)
def test_each_step_kind_matches_float64_reference(signature, kinds, kernels, device):
    mapping, memory = site(seed=3)
    x = randn(M, K, seed=1, dtype=torch.float64)
    extras = [extra(k, seed=10 + i, positive=signature.startswith("div")) for i, k in enumerate(kinds)]
    epi = Epilogue.parse(signature)
    got = roast_matmul_epilogue(x.float().to(device), memory.float().to(device), mapping, 0.4, True, epi,
                                [e.float().to(device) for e in extras])
    want = epi.apply(product64(x, memory, mapping, 0.4), extras)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


CHAINS = [
    # bias + act + scale + residual + cast: the transformer block's pattern
    ("add:x0|gelu_tanh|mul:0.5|add:x1|cast:bfloat16", ["col", "full"]),
    ("mul:x0|add:x1|silu", ["col", "col"]),
    ("add:x0|relu|sub:x1|div:4.0|tanh", ["col", "full"]),
    ("rsub:1.0|sigmoid|mul:x0|gelu|cast:float16", ["full"]),
    ("add:x0|cast:bfloat16|mul:3.0|cast:float32|sub:x1", ["col", "row"]),
    # graphs that read a value more than once: GPT-2's gelu_new after its bias, swish, a gated product
    ("add:x0|mul:0.5|mul(v1,v1)|mul(v3,v1)|mul:0.044715|add(v1,v5)|mul:0.7978845608028654|tanh|add:1.0"
     "|mul(v2,v9)", ["col"]),
    ("sigmoid|mul(v0,v1)|add(v2,x0)|exp|div(v4,v2)", ["full"]),
    ("mul:x0|erf|sub(v1,v2)|mul(v3,x1)|cast(v3,float16)|add(v4,v5)", ["col", "row"]),
]


def check_chain(signature, kinds, device, seed, tiling):
    """The generated kernel for ``signature`` on a float32 GEMM against its eager form in float64."""
    mapping, memory = site(seed=seed, tiling=tiling)
    x = randn(M, K, seed=seed - 3, dtype=torch.float64)
    extras = [extra(k, seed=10 * seed - 30 + i) for i, k in enumerate(kinds)]
    epi = Epilogue.parse(signature)
    got = roast_linear_epilogue(x.float().to(device), memory.float().to(device), mapping, 0.3, epi,
                                [e.float().to(device) for e in extras])
    want = epi.apply(product64(x, memory, mapping, 0.3), extras)  # float64 until a cast rounds
    assert got.dtype == epi.out_dtype(torch.float32, [e.float() for e in extras])
    # after a cast to 16 bits eager rounds every op, the kernel only at the cast and the store
    tol = 2e-2 if "cast:bfloat16" in signature or "cast:float16" in signature else 1e-4
    torch.testing.assert_close(got.double().cpu(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("signature,kinds", CHAINS)
def test_chains_match_float64_reference(signature, kinds, kernels, device):
    check_chain(signature, kinds, device, seed=5, tiling=(8, 16, 4, 64))


@pytest.mark.parametrize("signature,kinds",
                         [CHAINS[-3], CHAINS[-1], ("add:x0|relu|sub:x1|div:4.0|tanh", ["col", "full"])])
def test_split_k_runs_the_epilogue_on_the_summed_partials(signature, kinds, kernels, device, monkeypatch):
    # ROASTFX_SPLIT_K=3: the reduction shared by 3 programs per output block, the epilogue in eager torch
    monkeypatch.setenv("ROASTFX_SPLIT_K", "3")
    check_chain(signature, kinds, device, seed=7, tiling=(16, 8, 4, 32))


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_leading_dims_and_half_precision_inputs(path, monkeypatch, device):
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    mapping, memory = site(seed=6)
    x = randn(2, 3, K, seed=3, dtype=torch.float64).bfloat16()
    residual = randn(3, N, seed=4, dtype=torch.float64).bfloat16()  # broadcasts over the first dim
    epi = Epilogue.parse("mul:0.5|add:x0|silu")
    got = roast_linear_epilogue(x.to(device), memory.float().to(device), mapping, 0.2, epi, [residual.to(device)])
    assert got.shape == (2, 3, N) and got.dtype == torch.bfloat16
    want = epi.apply(x.double() @ reference.materialize(memory.bfloat16().double(), mapping, 0.2), [residual.double()])
    torch.testing.assert_close(got.double().cpu(), want, rtol=3e-2, atol=3e-2)


# -- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("signature,kinds", [
    ("add:x0|gelu_tanh|mul:0.5|add:x1", ["col", "full"]),
    ("mul:x0|sigmoid|rsub:x1|tanh", ["row", "col"]),
    ("add:x0|relu|div:x1|silu", ["col", "full"]),
    ("add:x0|mul:0.5|mul(v1,v1)|mul(v3,v1)|mul:0.044715|add(v1,v5)|mul:0.79788|tanh|add:1.0|mul(v2,v9)", ["col"]),
    ("sigmoid|mul(v0,v1)|mul(v2,x0)|sub(v3,v0)|erf", ["full"]),
])
def test_gradients_match_float64_reference(path, signature, kinds, monkeypatch, device):
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    mapping, memory = site(seed=7)
    x = randn(M, K, seed=5, dtype=torch.float64)
    extras = [extra(k, seed=30 + i, positive="div" in signature) for i, k in enumerate(kinds)]
    grad_y = randn(M, N, seed=9, dtype=torch.float64)
    epi = Epilogue.parse(signature)

    leaves = [t.float().to(device).requires_grad_() for t in (x, memory, *extras)]
    roast_linear_epilogue(leaves[0], leaves[1], mapping, 0.3, epi, leaves[2:]).backward(grad_y.float().to(device))
    ref = [t.clone().requires_grad_() for t in (x, memory, *extras)]
    epi.apply(product64(ref[0], ref[1], mapping, 0.3), ref[2:]).backward(grad_y)

    for i, (got, want) in enumerate(zip(leaves, ref)):
        name = ["x", "memory"][i] if i < 2 else f"extra x{i - 2}"
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_transposed_view_forward_and_gradients(path, monkeypatch, device):
    # a weight read the other way round (a tied embedding as an output head): x @ V^T
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    mapping = random_mapping(N, K, 8, 16, alignment=4, window_start=64, seed=14)
    memory = random_memory(mapping, seed=14)
    x, bias = randn(M, K, seed=21, dtype=torch.float64), randn(N, seed=22, dtype=torch.float64)
    grad_y = randn(M, N, seed=23, dtype=torch.float64)
    epi = Epilogue.parse("add:x0|tanh|mul:1.5")
    leaves = [t.float().to(device).requires_grad_() for t in (x, memory, bias)]
    got = roast_linear_epilogue(leaves[0], leaves[1], mapping, 0.3, epi, [leaves[2]], transpose_view=True)
    got.backward(grad_y.float().to(device))
    ref = [t.clone().requires_grad_() for t in (x, memory, bias)]
    want = epi.apply(ref[0] @ reference.materialize(ref[1], mapping, 0.3).t(), [ref[2]])
    want.backward(grad_y)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)
    for got_t, want_t in zip(leaves, ref):
        torch.testing.assert_close(got_t.grad.double().cpu(), want_t.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path,grad_norm", [("triton", False), ("reference", False), ("triton", True),
                                            ("reference", True)])
def test_op_passes_opcheck(path, grad_norm, monkeypatch, device):
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    mapping, memory = site(seed=8)
    x = randn(2, 5, K, seed=6, device=device).requires_grad_()
    mem = memory.float().to(device).requires_grad_()
    bias = randn(N, seed=7, device=device).requires_grad_()
    residual = randn(5, N, seed=8, device=device).requires_grad_()
    args = (x, mem, mapping_args(mapping), 0.5, [bias, residual], "add:x0|gelu|mul:0.25|add:x1|cast:bfloat16", False,
            grad_norm)
    torch.library.opcheck(torch.ops.roastfx.roast_linear_epilogue.default, args)


def test_op_compiles_with_aot_autograd(kernels, device):
    mapping, memory = site(seed=9)
    mem = memory.float().to(device).requires_grad_()
    x, bias = randn(6, K, seed=10, device=device), randn(N, seed=11, device=device)

    def step(x, mem):
        return roast_linear_epilogue(x, mem, mapping, 0.5, "add:x0|silu|mul:2.0", [bias]).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, mem), mem)[0]
    want = torch.autograd.grad(step(x, mem), mem)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- one kernel per pattern: cache and dump ----------------------------------------------------
def test_kernels_are_cached_by_pattern(tmp_path, monkeypatch):
    monkeypatch.setenv("ROASTFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton_epilogue, "_kernels", {})
    first = load_kernel(Epilogue.parse("mul:0.5|add:x0|relu"))
    assert load_kernel(Epilogue.parse("mul:0.5|add:x0|relu")) is first
    assert load_kernel(Epilogue.parse("mul:-2.0|add:x0|relu")) is first  # constants are arguments
    other = load_kernel(Epilogue.parse("mul:0.5|add:x0|silu"))
    assert other is not first
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("roast_linear_epilogue_") and f.endswith(".py") for f in files)


def test_constants_of_one_pattern_give_their_own_results(kernels, device):
    mapping, memory = site(seed=10)
    x = randn(M, K, seed=12, device=device)
    mem = memory.float().to(device)
    half = roast_linear_epilogue(x, mem, mapping, 1.0, "mul:0.5|add:1.0")
    triple = roast_linear_epilogue(x, mem, mapping, 1.0, "mul:3.0|add:-2.0")
    plain = product64(x.cpu(), memory, mapping, 1.0)
    torch.testing.assert_close(half.double().cpu(), plain * 0.5 + 1.0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(triple.double().cpu(), plain * 3.0 - 2.0, rtol=1e-4, atol=1e-4)


def test_dump_writes_readable_source_per_pattern(tmp_path, monkeypatch, kernels, device):
    monkeypatch.setenv("ROASTFX_DUMP_KERNELS", str(tmp_path))
    monkeypatch.setattr(triton_epilogue, "_dumped", set())
    mapping, memory = site(seed=11)
    epi = Epilogue.parse("add:x0|gelu_tanh|mul:0.5|add:x1|cast:bfloat16")
    bias, residual = randn(N, seed=13, device=device), randn(M, N, seed=14, device=device)
    roast_linear_epilogue(randn(M, K, seed=15, device=device), memory.float().to(device), mapping, 0.3, epi,
                          [bias, residual])
    # the bias broadcasts down the rows, the residual is full: the kernel loads each as such
    path = tmp_path / f"{triton_epilogue.kernel_name(epi, 'linear', ('col', 'full'))}.py"
    text = path.read_text()
    ast.parse(text)  # a real Python module
    assert f"Epilogue pattern: {epi.pattern}" in text
    assert "# gelu_tanh: F.gelu(approximate='tanh')" in text
    assert "# add:x1: operator.add" in text and "# cast:bfloat16: Tensor.to(dtype)" in text
    assert "x0 = tl.load(x0_ptr + offs_n * stride_x0n, mask=offs_n < N, other=0.0)[None, :]" in text  # a row
    assert "x1 = tl.load(x1_ptr + offs_m[:, None] * stride_x1m + offs_n[None, :] * stride_x1n" in text  # a block
    assert "roast_matmul_block(" in text  # the hashing stays in the shared helper
    assert "roast_index_and_sign" not in text


# -- the IR ------------------------------------------------------------------------------------
def test_signature_round_trips_and_pattern_hides_constants():
    epi = Epilogue((Step("add", ("v0", "x0")), Step("gelu_tanh", ("v1",)), Step("mul", ("v2", 0.1)),
                    Step("sub", ("x1", "v3")), Step("cast", ("v4",), dtype="bfloat16")))
    # steps on the value just before them read as a chain
    assert epi.signature == "add:x0|gelu_tanh|mul:0.1|rsub:x1|cast:bfloat16"
    assert Epilogue.parse(epi.signature) == epi
    assert epi.pattern == "add:x0|gelu_tanh|mul:c0|rsub:x1|cast:bfloat16"
    assert epi.constants == (0.1,) and epi.num_extras == 2
    joined = Epilogue.parse("add:x0|relu") + Epilogue.parse("mul:x0")
    assert joined.signature == "add:x0|relu|mul:x1"


def test_graph_shaped_epilogues_read_earlier_values():
    # GPT-2's gelu_new as dynamo traces it: z is read three times
    sig = ("mul:0.5|mul(v0,v0)|mul(v2,v0)|mul:0.044715|add(v0,v4)|mul:0.7978845608028654|tanh|add:1.0"
           "|mul(v1,v8)")
    epi = Epilogue.parse(sig)
    assert epi.signature == sig and Epilogue.parse(epi.signature) == epi
    assert epi.pattern == ("mul:c0|mul(v0,v0)|mul(v2,v0)|mul:c1|add(v0,v4)|mul:c2|tanh|add:c3|mul(v1,v8)")
    z = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(epi.apply(z), F.gelu(z, approximate="tanh"), rtol=1e-12, atol=1e-12)
    # a constant on the left of a commutative op is put second: one computation, one signature
    assert Step("mul", (2.0, "v0")) == Step("mul", ("v0", 2.0))
    assert Epilogue((Step("sigmoid", ("v0",)), Step("mul", ("v1", "v0")))).signature == "sigmoid|mul(v1,v0)"
    swish = Epilogue.parse("sigmoid|mul(v0,v1)|cast(v0,float16)|add(v2,v3)")
    torch.testing.assert_close(swish.apply(z), z * torch.sigmoid(z) + z.half(), rtol=0, atol=0)
    lines = swish.triton_lines()
    assert lines[0] == "v0 = z" and lines[-1] == "z = v4" and "v4 = v2 + v3" in lines


def test_out_dtype_follows_torch_promotion():
    cases = [
        ("add:x0", torch.bfloat16, [torch.zeros(3)]),  # bf16 + fp32 tensor -> fp32
        ("add:x0", torch.bfloat16, [torch.zeros((), dtype=torch.float32)]),  # 0-dim: stays bf16
        ("mul:2.0|cast:float16", torch.float32, []),
        ("cast:bfloat16|add:x0", torch.float32, [torch.zeros(3, dtype=torch.bfloat16)]),
    ]
    for signature, dtype, extras in cases:
        epi = Epilogue.parse(signature)
        assert epi.out_dtype(dtype, extras) == epi.apply(torch.zeros(2, 3, dtype=dtype), extras).dtype, signature


def test_bad_epilogues_name_the_value():
    with pytest.raises(ValueError, match="'pow'"):
        Epilogue.parse("pow:2.0")
    with pytest.raises(ValueError, match="'float64'.*float32, float16, bfloat16"):
        Epilogue.parse("cast:float64")
    with pytest.raises(ValueError, match="not finite"):
        Step("mul", ("v0", float("inf")))
    with pytest.raises(ValueError, match="reads v3, which is not computed before it"):
        Epilogue.parse("relu|mul(v0,v3)")
    with pytest.raises(ValueError, match="only constants"):
        Step("add", (1.0, 2.0))
    with pytest.raises(ValueError, match="takes 2 operand"):
        Epilogue.parse("mul(v0)")
    with pytest.raises(ValueError, match="'q7'"):
        Epilogue.parse("mul(v0,q7)")
    with pytest.raises(ValueError, match="'y3'"):
        Epilogue.parse("add:y3")
    with pytest.raises(ValueError, match=r"x\[1\]"):
        Epilogue.parse("add:x1")
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 37, 70\)"):
        Epilogue.parse("add:x0").check_extras((M, N), [torch.zeros(2, M, N)])
    with pytest.raises(ValueError, match="takes 1 extra tensors, got 0"):
        Epilogue.parse("add:x0").apply(torch.zeros(2, 2))


def test_op_errors_name_the_bad_value(kernels, device):
    mapping, memory = site(seed=15)
    mem, x = memory.float().to(device), torch.zeros(4, K, device=device)
    with pytest.raises(ValueError, match="44 features.*45 expected"):
        roast_linear_epilogue(x[:, :44], mem, mapping, 1.0, "relu")
    with pytest.raises(ValueError, match="'softplus'"):
        roast_linear_epilogue(x, mem, mapping, 1.0, "relu|softplus")
    with pytest.raises(ValueError, match=r"x0 has shape \(5, 70\)"):
        roast_linear_epilogue(x, mem, mapping, 1.0, "add:x0", [torch.zeros(5, N, device=device)])
    with pytest.raises(TypeError, match="Epilogue or a signature str, got int"):
        roast_linear_epilogue(x, mem, mapping, 1.0, 3)


def test_apply_is_the_eager_chain():
    z, r = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = Epilogue.parse("add:x0|gelu|mul:0.5|rdiv:3.0|silu").apply(z, [r])
    torch.testing.assert_close(got, F.silu(3.0 / (F.gelu(z + r) * 0.5)), rtol=0, atol=0)


# -- configs and autotuning ----------------------------------------------------------------------
def test_candidates_per_hardware_profile_and_hash_tile():
    for name in ("h100", "a100", "l4"):
        profile = PROFILES[name]
        fitting = configs.candidates(profile, element_size=2)
        assert fitting and all(c.shared_memory(2) <= profile.smem_per_block_bytes for c in fitting)
    assert len(configs.candidates(PROFILES["l4"], 4)) < len(configs.candidates(PROFILES["h100"], 4))
    aligned = configs.candidates(PROFILES["h100"], 2, block_tile=(0, 128, 64))
    assert aligned and all(c.block_n % 128 == 0 and c.block_k % 64 == 0 for c in aligned)
    assert len(aligned) < len(configs.candidates(PROFILES["h100"], 2))
    # a 5x3 tile divides no block: every fitting candidate stays (the mapping is hashed per element)
    assert configs.candidates(PROFILES["h100"], 2, block_tile=(0, 3, 5)) == configs.candidates(PROFILES["h100"], 2)
    with pytest.raises(TypeError, match="'h100'"):
        configs.candidates("h100")


def test_autotune_switch(monkeypatch):
    monkeypatch.setattr(configs, "_autotune", False)
    monkeypatch.delenv("ROASTFX_AUTOTUNE", raising=False)
    assert not configs.autotune_enabled()
    monkeypatch.setenv("ROASTFX_AUTOTUNE", "1")
    assert configs.autotune_enabled()
    monkeypatch.delenv("ROASTFX_AUTOTUNE")
    configs.set_autotune(True)
    assert configs.autotune_enabled()
    with pytest.raises(TypeError, match="'yes'"):
        configs.set_autotune("yes")


def test_autotune_times_fitting_candidates_once_per_bucket(monkeypatch):
    # a CUDA device object needs no GPU; the interpreter check and the device query are bypassed
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "_devices", {0: (100 * 1024, 80)})  # an A100-like device: no sm_90 configs
    monkeypatch.setattr(configs, "_tuned", {})
    monkeypatch.setattr(configs, "_autotune", True)
    timed = []

    def cost(cfg):  # pretend the narrowest-N config is fastest
        return cfg.block_n + cfg.block_m / 1000

    def bench(cfg):
        timed.append(cfg)
        return cost(cfg)

    cuda = torch.device("cuda", 0)
    tile = (0, 32, 32)
    first = configs.choose(cuda, 1000, 768, 3072, 2, kernel="k", bench=bench, block_tile=tile, dtype=torch.float16)
    expected = configs.candidates(100 * 1024, 2, tile)
    assert timed == expected  # every plan-compatible candidate that fits, and nothing else
    assert first == min(expected, key=cost)
    n = len(timed)
    # same (kernel, bucket, dtype): cached, no timing
    assert configs.choose(cuda, 1020, 700, 3000, 2, kernel="k", bench=bench, block_tile=tile,
                          dtype=torch.float16) == first
    assert len(timed) == n
    configs.choose(cuda, 1000, 768, 3072, 2, kernel="k", bench=bench, block_tile=tile, dtype=torch.bfloat16)
    assert len(timed) == 2 * n  # another dtype is tuned on its own
    assert len(configs.tuned_configs()) == 2
    # autotuning off: the heuristic, never a timing
    configs.set_autotune(False)
    heuristic = configs.choose(cuda, 1000, 768, 3072, 2, kernel="k", bench=bench, block_tile=tile)
    assert len(timed) == 2 * n and heuristic == configs.pick(1000, 768, 3072, 100 * 1024, 2, tile)


def test_autotune_under_the_interpreter_keeps_the_heuristic_and_results(kernels, device, monkeypatch):
    mapping, memory = site(seed=12)
    x, bias = randn(M, K, seed=16, device=device), randn(N, seed=17, device=device)
    mem = memory.float().to(device)
    monkeypatch.setattr(configs, "_autotune", False)
    before = roast_linear_epilogue(x, mem, mapping, 0.3, "add:x0|relu", [bias])
    monkeypatch.setattr(configs, "_tuned", {})
    configs.set_autotune(True)
    after = roast_linear_epilogue(x, mem, mapping, 0.3, "add:x0|relu", [bias])
    assert torch.equal(before, after)
    if configs.interpreting():
        assert configs.tuned_configs() == {}  # nothing timed: interpreted timings mean nothing
    else:
        assert len(configs.tuned_configs()) == 1  # timed once, then cached
        roast_linear_epilogue(x, mem, mapping, 0.3, "add:x0|relu", [bias])
        assert len(configs.tuned_configs()) == 1


def test_results_do_not_depend_on_the_config(device):
    mapping, memory = site(seed=13, tiling=(8, 16, 4, 64))
    x, residual = randn(M, K, seed=18, device=device), randn(M, N, seed=19, device=device)
    epi = Epilogue.parse("mul:0.5|add:x0|tanh")
    outs = [roast_matmul_epilogue(x, memory.float().to(device), mapping, 0.3, True, epi, [residual], config=c)
            for c in (configs.BlockConfig(32, 32, 32, 1, 1), configs.BlockConfig(64, 32, 64, 1, 1),
                      configs.BlockConfig(32, 64, 32, 1, 1))]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_autotune_timings_run_every_kernel_into_scratch_buffers(deterministic, monkeypatch, device):
    # the timing closures of all three kernels, run under the interpreter with a fake do_bench:
    # each candidate launches once into scratch buffers, and the real outputs stay right
    import triton.testing

    from roastfx.codegen.triton_matmul import roast_grad_memory, roast_matmul

    launches = []

    def fake_do_bench(fn):
        fn()
        launches.append(1)
        return float(len(launches))

    options = [configs.BlockConfig(64, 32, 64, 1, 1), configs.BlockConfig(32, 32, 32, 1, 1)]
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(configs, "_tuned", {})
    monkeypatch.setattr(configs, "choose", lambda device, m, n, k, element_size, kernel=None, bench=None, **_:
                        configs.tune((kernel, m, n, k), options, bench))
    mapping, memory = site(seed=16)
    x, res = randn(M, K, seed=24, dtype=torch.float64), randn(M, N, seed=25, dtype=torch.float64)
    mem = memory.float().to(device)
    view = reference.materialize(memory, mapping, 0.3)

    y = roast_matmul_epilogue(x.float().to(device), mem, mapping, 0.3, True, Epilogue.parse("add:x0|tanh"),
                              [res.float().to(device)])
    torch.testing.assert_close(y.double().cpu(), torch.tanh(x @ view + res), rtol=1e-4, atol=1e-4)
    z, _ = roast_matmul(x.float().to(device), mem, mapping, 0.3, True)
    torch.testing.assert_close(z.double().cpu(), x @ view, rtol=1e-4, atol=1e-4)
    grad = roast_grad_memory(x.float().to(device), res.float().to(device), mem.numel(), mapping, 0.3,
                             deterministic=deterministic)
    ref_mem = memory.clone().requires_grad_()
    (reference.materialize(ref_mem, mapping, 0.3) * (x.t() @ res)).sum().backward()
    torch.testing.assert_close(grad.double().cpu(), ref_mem.grad, rtol=1e-4, atol=1e-4)

    assert len(launches) == 3 * len(options)  # each kernel timed every candidate once
    assert sorted(k[0].split("[")[0] for k in configs.tuned_configs()) == [
        "roast_grad_memory", "roast_matmul", "roast_matmul_epilogue"]
    assert all(c == options[0] for c in configs.tuned_configs().values())  # the first timed is "fastest"


# -- after an embedding lookup -------------------------------------------------------------------
def embedding_case(seed=0):
    mapping = random_mapping(50, 40, 4, 8, alignment=2, window_start=6, seed=seed)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(seed))
    ids[0, :2] = 4  # a repeated id, and the padding row below
    return mapping, random_memory(mapping, seed=seed), ids


@pytest.mark.parametrize("signature,shapes", [
    ("mul:2.5|add:x0|add:x1", [(7, 40), (3, 7, 40)]),  # BERT: scaled word + position + token type
    ("add:x0|mul:x1|gelu|cast:bfloat16", [(40,), (3, 7, 1)]),  # a per-column vector, a per-token factor
    ("mul(v0,v0)|add:x0", [()]),
])
def test_embedding_epilogue_kernel_matches_float64(signature, shapes, device):
    from roastfx.codegen.triton_epilogue import roast_embedding_epilogue

    mapping, memory, ids = embedding_case(seed=len(shapes))
    extras = [randn(*(s or (1,)), seed=40 + i, dtype=torch.float64).reshape(s) for i, s in enumerate(shapes)]
    epi = Epilogue.parse(signature)
    got = roast_embedding_epilogue(memory.float().to(device), mapping, 0.3, ids.to(device), epi,
                                   [e.float().to(device) for e in extras])
    want = epi.apply(reference.materialize(memory.double(), mapping, 0.3)[ids], extras)
    assert got.shape == (3, 7, 40) and got.dtype == epi.out_dtype(torch.float32, [e.float() for e in extras])
    tol = 2e-2 if "bfloat16" in signature else 1e-5
    torch.testing.assert_close(got.double().cpu(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_embedding_epilogue_op_gradients_and_padding_idx(path, monkeypatch, device):
    """The memory's gradient is nn.Embedding's (the padding row gets none) under the epilogue's vjp."""
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    mapping, memory, ids = embedding_case(seed=9)
    pos = randn(7, 40, seed=50, dtype=torch.float64)
    grad = randn(3, 7, 40, seed=51, dtype=torch.float64)
    sig = "mul:2.0|add:x0|silu"
    op = torch.ops.roastfx.roast_embedding_epilogue.default
    mem_k, pos_k = memory.float().to(device).requires_grad_(), pos.float().to(device).requires_grad_()
    op(ids.to(device), mem_k, mapping_args(mapping), 0.3, [pos_k], sig, 4, False).backward(grad.float().to(device))
    # the reference: the dense table rebuilt from the memory in float64, torch's embedding with padding_idx
    mem_r, pos_r = memory.double().requires_grad_(), pos.clone().requires_grad_()
    table = reference.materialize(mem_r, mapping, 0.3)
    want = F.silu(F.embedding(ids, table, padding_idx=4) * 2.0 + pos_r)
    want.backward(grad)
    torch.testing.assert_close(mem_k.grad.double().cpu(), mem_r.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pos_k.grad.double().cpu(), pos_r.grad, rtol=1e-4, atol=1e-5)
    torch.library.opcheck(op, (ids.to(device), mem_k.detach().requires_grad_(), mapping_args(mapping), 0.3,
                               [pos_k.detach()], sig, None, False))
