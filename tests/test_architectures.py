"""Compressed models of many architectures through the roast backend: compiled == eager,
gradients included, no dense weight left anywhere, and which weight reads become roast ops."""
import pytest
import torch
from torch import nn


import roastfx
from roastfx.passes.capture_sites import module_weight_attrs


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                         nn.Conv2d(8, 16, 1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def unet3d():
    """A small 3-D encoder-decoder (video, volumes): conv3d, batch norm, a grouped strided conv3d, and a
    transposed conv3d back up."""
    return nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                         nn.Conv3d(8, 16, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                         nn.ConvTranspose3d(16, 4, 2, stride=2), nn.Conv3d(4, 3, 1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.gru = nn.GRU(16, 12, batch_first=True, bidirectional=True)
        self.mha = nn.MultiheadAttention(24, 4, batch_first=True)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.mha(h, h, h)[0]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x)[0])


class Dlrm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(100, 16, mode="sum")
        self.top = nn.Linear(16, 1)

    def forward(self, ids, offsets):
        return self.top(self.bag(ids, offsets))


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, num_hidden_layers=1, hidden_size=32,
                                               num_attention_heads=2, intermediate_size=64, num_labels=3))


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                     num_labels=3))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))


def llama():
    """Grouped-query attention, rotary positions, RMSNorm, a SwiGLU MLP, the LM head tied to the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True))


def mixtral():
    """A mixture of experts: a router picks 2 of 4 expert MLPs per token (data-dependent indexing)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=32))


def mixtral_batched_mm():
    """The same, with transformers' ``batched_mm`` experts: each token's expert weights picked by index
    (``W[expert_ids]``) and multiplied in one bmm, for small batches."""
    model = mixtral()
    model.set_experts_implementation("batched_mm")
    return model


def falcon():
    """Falcon's linear layers compute ``x @ self.weight.T`` (the property: a getattr in dynamo's graph)."""
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))


def deepseek_v3():
    """Multi-head latent attention (low-rank q and kv projections), a dense first layer, then shared experts
    beside routed ones whose router computes in float32 (``weight.type(torch.float32)``)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=32))


def xlnet():
    """Two-stream relative attention whose projections are (d_model, heads, head_dim) Parameters read by
    einsum (``ibh,hnd->ibnd``, ``ibnd,hnd->ibh``)."""
    from transformers import XLNetConfig, XLNetLMHeadModel

    return XLNetLMHeadModel(XLNetConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, d_inner=64))


def wavlm():
    """Wav2Vec2's front end; attention through F.multi_head_attention_forward with its q, k and v Linears'
    weights passed separately (use_separate_proj_weight=True), plus a gated relative position bias."""
    from transformers import WavLMConfig, WavLMForCTC

    return WavLMForCTC(WavLMConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                   num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2))


def whisper():
    """Speech encoder-decoder: conv1d stem over mel features, cross-attention."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def qwen3_moe():
    """Another mixture-of-experts family: per-head q/k norms, stacked experts behind a top-2 router."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                              max_position_embeddings=32, head_dim=8))


def albert():
    """One layer's weights shared by every layer (each weight read twice per forward), a factorized embedding."""
    from transformers import AlbertConfig, AlbertForMaskedLM

    return AlbertForMaskedLM(AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=16))


def wav2vec2():
    """A strided conv1d feature extractor, and a grouped positional conv under weight norm per kernel tap
    (dim=2): its direction is a site, read by roast_conv_row_scaled (the kernels scale each tap's rows)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    return Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, conv_dim=(8, 8), conv_stride=(5, 2),
                                         conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                                         num_conv_pos_embedding_groups=2))


def mamba():
    """A state-space model: in/out projections, a depthwise causal conv1d, the selective scan's projections."""
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=1, expand=2,
                                        conv_kernel=4))


def encodec():
    """A neural audio codec: convs and transposed convs under weight norm (dim 0, every one of them), an LSTM,
    a residual vector quantizer."""
    from transformers import EncodecConfig, EncodecModel

    return EncodecModel(EncodecConfig(target_bandwidths=[8.0], sampling_rate=8000, audio_channels=1, hidden_size=16,
                                      num_filters=4, num_residual_layers=1, upsampling_ratios=[4, 2], codebook_size=16,
                                      codebook_dim=16, num_lstm_layers=1))


def convnext():
    """Depthwise 7x7 convs, LayerNorm and Linear layers over channels-last activations."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                                                         num_stages=2, image_size=32, num_labels=3))


def _gen():
    return torch.Generator().manual_seed(0)


CASES = {
    "cnn-groups-depthwise": (cnn, lambda: ((torch.randn(2, 3, 9, 9, generator=_gen()),), {})),
    "unet3d": (unet3d, lambda: ((torch.randn(2, 2, 6, 5, 4, generator=_gen()),), {})),
    "lstm-gru-mha": (Recurrent, lambda: ((torch.randn(2, 5, 8, generator=_gen()),), {})),
    "mha": (Attention, lambda: ((torch.randn(2, 5, 16, generator=_gen()),), {})),
    "embedding-bag": (Dlrm, lambda: ((torch.randint(0, 100, (10,), generator=_gen()), torch.tensor([0, 3, 7])), {})),
    "vit": (vit, lambda: ((torch.randn(2, 3, 16, 16, generator=_gen()),), {})),
    "resnet": (resnet, lambda: ((torch.randn(2, 3, 32, 32, generator=_gen()),), {})),
    "t5": (t5, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen()),
                             "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=_gen())})),
    "llama": (llama, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen())})),
    "mixtral": (mixtral, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen())})),
    "mixtral-batched-mm": (mixtral_batched_mm, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7),
                                                                                         generator=_gen())})),
    "whisper": (whisper, lambda: ((), {"input_features": torch.randn(2, 8, 32, generator=_gen()),
                                       "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=_gen())})),
    "qwen3-moe": (qwen3_moe, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen())})),
    "wavlm": (wavlm, lambda: ((), {"input_values": torch.randn(2, 400, generator=_gen())})),
    "xlnet": (xlnet, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen())})),
    "falcon": (falcon, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen())})),
    "deepseek-v3": (deepseek_v3, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen())})),
    "albert": (albert, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen())})),
    "wav2vec2": (wav2vec2, lambda: ((), {"input_values": torch.randn(2, 400, generator=_gen())})),
    "mamba": (mamba, lambda: ((), {"input_ids": torch.randint(0, 64, (2, 7), generator=_gen())})),
    "convnext": (convnext, lambda: ((torch.randn(2, 3, 32, 32, generator=_gen()),), {})),
    "encodec": (encodec, lambda: ((), {"input_values": torch.randn(2, 1, 64, generator=_gen()), "bandwidth": 8.0})),
}
# Whisper's sinusoidal position table is frozen (requires_grad=False): it cannot share the trainable memory
EXCLUDE = {"whisper": ["*embed_positions*"]}
# found only with example_inputs: Mixtral's router (F.linear on a plain Parameter) and its experts, stacked
# (experts, out, in) Parameters that transformers reads through a grouped GEMM (grouped sites)
TRACED = {"mixtral": ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                      "model.layers.0.mlp.experts.down_proj"],
          "mixtral-batched-mm": ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                                 "model.layers.0.mlp.experts.down_proj"],
          "qwen3-moe": ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                        "model.layers.0.mlp.experts.down_proj"],
          "xlnet": [f"transformer.layer.0.rel_attn.{w}" for w in "qkvor"],
          "deepseek-v3": ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj",
                          "model.layers.1.mlp.experts.down_proj"]}


# (fused reads, all reads) the backend reports. Compressed RNNs run step by step under dynamo (roastfx/rnn.py):
# the LSTM's input projection + 5 recurrent steps, the same for each GRU direction, the attention's 2
FUSED = {
    "cnn-groups-depthwise": (4, 4), "unet3d": (4, 4), "lstm-gru-mha": (20, 20), "mha": (3, 3), "embedding-bag": (2, 2),
    "vit": (8, 8), "resnet": (9, 9), "t5": (21, 21), "llama": (16, 16), "whisper": (20, 20),
    # the experts' stacked weights are grouped sites: transformers' grouped GEMM over them is a roast_grouped_mm,
    # and so is its batched_mm's bmm over each token's picked experts (the tokens sorted by expert)
    "mixtral": (9, 9), "mixtral-batched-mm": (9, 9), "qwen3-moe": (9, 9), "albert": (18, 18), "wav2vec2": (11, 11),
    "convnext": (9, 9),
    # Falcon reads each weight as .T (a transposing step of the read, like .t()); DeepSeek-V3's router casts
    # its weight with .type(torch.float32), as it casts its input: the roast op computes in float32 itself
    "falcon": (6, 6), "deepseek-v3": (21, 21),
    # XLNet's 3-D projection weights: each einsum over one is a GEMM over the weight as a matrix
    "xlnet": (9, 9),
    # WavLM's attention takes separate q/k/v weights: 4 reads in one roast_attention per layer
    "wavlm": (13, 13),
    # Mamba's slow path squeezes its depthwise conv1d weight and unsqueezes it again for F.conv1d: reshapes of
    # the read, so a roast_conv. (Its dt_proj weight multiplies from the left, W @ x: fused as (x^T @ W^T)^T)
    "mamba": (7, 7),
    # weight norm's scale moved out of each conv and transposed conv (passes/split_weight_norm.py); the LSTM
    # step by step
    "encodec": (28, 28),
}


def _output(out):
    for name in ("logits", "audio_values"):
        if hasattr(out, name):
            return getattr(out, name)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_eager(name, monkeypatch):
    from test_fuse_roast_ops import record_uses

    import transformers

    transformers.logging.set_verbosity_error()
    build, inputs = CASES[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    args, kwargs = inputs()
    example = (kwargs if not args else args) if name in TRACED else None
    model = roastfx.compress(build(), "4x", init="random", exclude=EXCLUDE.get(name, ()),
                             example_inputs=example).eval()
    # every matmul weight of every module now reads from the memory: none is a dense Parameter (but those
    # excluded), and neither are the weights only a trace finds
    matmul_weights = [(m, attr) for m in model.modules() for attr, _, _ in module_weight_attrs(m)]
    assert matmul_weights
    dense = {n for n, _ in model.named_parameters()}
    assert not any(attr in m._parameters and not roastfx.passes.capture_sites.name_matches(
        [f"{mn}.{attr}" for mn, mm in model.named_modules() if mm is m], EXCLUDE.get(name, ()))
        for m, attr in matmul_weights)
    assert not dense & set(TRACED.get(name, ()))
    sites = {s.name for s in roastfx.roast_state(model).plan.sites}
    assert set(TRACED.get(name, ())) <= sites
    experts = [s for s in roastfx.roast_state(model).plan.sites if ".experts." in s.name]
    assert all(s.op == "grouped" and s.transposed for s in experts) and len(experts) == 2 * (
        "moe" in name or "mixtral" in name or name == "deepseek-v3")
    eager = _output(model(*args, **kwargs))
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    uses = record_uses(monkeypatch)
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})
    out = _output(compiled(*args, **kwargs))
    out.square().mean().backward()
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-4)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, grads[n], atol=1e-5, rtol=1e-4), n
    assert (sum(u.fused for u in uses), len(uses)) == FUSED[name], [(u.fused, u.why) for u in uses if not u.fused]


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12),
                    reason="torch 2.11's inductor emits C++ that does not compile for this model on CPU (an undeclared "
                           "index in a bounds check under dynamic shapes), for the dense model as well")
@pytest.mark.parametrize("name", ["llama", "mixtral-batched-mm"])
def test_compressed_model_generates_the_same_tokens_eager_and_compiled(name, monkeypatch):
    """Greedy decoding with a KV cache (prefill, then one token at a time: a new shape each step), the forward
    compiled by the roast backend (inductor) with dynamic shapes; for Mixtral with transformers' batched_mm
    experts (meant for decoding), each step's few tokens sorted by expert into roast_picked_mm."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch._dynamo.reset()
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 5), generator=_gen())
    model = roastfx.compress(CASES[name][0](), "4x", init="random",
                             example_inputs={"input_ids": ids} if name in TRACED else None).eval()
    from test_fuse_roast_ops import record_uses

    uses = record_uses(monkeypatch)
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        model.forward = torch.compile(model.forward, backend="roast", dynamic=True)
        compiled = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert eager.shape == (2, 11) and torch.equal(eager[:, :5], ids)
    assert torch.equal(compiled, eager)
    assert uses and all(u.fused for u in uses), [u.why for u in uses if not u.fused]
    assert any("roast_picked_mm" in u.why for u in uses) == (name == "mixtral-batched-mm")
