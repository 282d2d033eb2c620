"""Compress many transformers architectures (tiny configs, random weights) and compile them with the roast
backend: how many weight reads fuse, whether compiled equals eager (output and memory gradient), and why each
read that stays materialized does. A coverage check that finds what the backend does not handle yet; the
models the tests keep are in tests/test_architectures.py.

    .venv/bin/python scripts/sweep_architectures.py            # every model below (about 10 minutes on 2 cores: 96 of them took 9)
    .venv/bin/python scripts/sweep_architectures.py xlnet wavlm

Each model is compressed 4x with init="random" and ``example_inputs`` (so functional and stacked weights are
found), run eagerly (forward + backward of the mean square of its output), then compiled
(``options={"inner": "aot_eager"}``) and run again. Columns: sites in the plan, fused / all weight reads in
the compiled graphs, the largest output difference, the memory gradient's relative difference. A model whose
dense version already fails the same two steps (eager, then ``backend="aot_eager"``), or whose compiled output
differs from its eager output, is reported as such.
"""
from __future__ import annotations

import sys
import traceback

import torch


def _ids(n=7):
    return lambda: {"input_ids": torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(0))}


def _pixels(size=32):
    return lambda: {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _wave():
    return {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(0))}


def _with_image_tokens(batch=2, tokens=4, image_token=63):
    """Inputs of a vision-language model: ``tokens`` image placeholder ids before 5 text ids, and the images."""
    return lambda: {"input_ids": torch.cat([torch.full((batch, tokens), image_token),
                                            _ids(5)()["input_ids"][:batch] % 60], 1),
                    "pixel_values": torch.randn(batch, 3, 16, 16, generator=_gen(1))}


def _patches():
    """Pix2Struct's flattened patches: (row, column) of each patch (from 1), then its 48 pixel values."""
    patches = torch.randn(2, 6, 50, generator=_gen())
    patches[..., 0] = torch.arange(6) % 3 + 1
    patches[..., 1] = torch.arange(6) // 3 + 1
    return {"flattened_patches": patches, "decoder_input_ids": _ids(5)()["input_ids"]}


def cases() -> dict:
    import transformers as T

    lm = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)
    vit = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64)
    audio = dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
                 num_conv_pos_embedding_groups=2)
    text_vision = dict(text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=32),
                       vision_config=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64))
    both = lambda: {**_ids()(), **_pixels(16)()}  # noqa: E731
    s2s = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
               pad_token_id=0, decoder_start_token_id=0)
    dec = lambda: {**_ids()(), "decoder_input_ids": _ids(5)()["input_ids"]}  # noqa: E731
    vis = dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64)
    return {
        # decoder-only language models
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(**lm, ffn_dim=64, word_embed_proj_dim=32)), _ids()),
        "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)),
                  _ids()),
        "gpt-neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**lm)), _ids()),
        "gptj": (lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=2, rotary_dim=8,
                                                        n_positions=32)), _ids()),
        "gpt-bigcode": (lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=1,
                                                                           n_head=2, n_positions=32)), _ids()),
        "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                              num_attention_heads=2)), _ids()),
        "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(**lm)), _ids()),
        "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**lm, pad_token_id=0)), _ids()),
        "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**lm, num_key_value_heads=1, head_dim=16)), _ids()),
        "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**lm, num_key_value_heads=1, head_dim=16)), _ids()),
        "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**lm, num_key_value_heads=1)), _ids()),
        "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**lm, num_key_value_heads=1)), _ids()),
        "stablelm": (lambda: T.StableLmForCausalLM(T.StableLmConfig(**lm, num_key_value_heads=2,
                                                                    partial_rotary_factor=0.5)), _ids()),
        "starcoder2": (lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**lm, num_key_value_heads=1)), _ids()),
        "cohere": (lambda: T.CohereForCausalLM(T.CohereConfig(**lm, num_key_value_heads=1)), _ids()),
        "xlnet": (lambda: T.XLNetLMHeadModel(T.XLNetConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2,
                                                           d_inner=64)), _ids()),
        # mixtures of experts
        "olmoe": (lambda: T.OlmoeForCausalLM(T.OlmoeConfig(**{**lm, "intermediate_size": 32}, num_experts=4,
                                                           num_experts_per_tok=2)), _ids()),
        "granitemoe": (lambda: T.GraniteMoeForCausalLM(T.GraniteMoeConfig(**lm, num_local_experts=4,
                                                                          num_experts_per_tok=2)), _ids()),
        "phimoe": (lambda: T.PhimoeForCausalLM(T.PhimoeConfig(**lm, num_key_value_heads=1, num_local_experts=4,
                                                              num_experts_per_tok=2)), _ids()),
        "deepseek-v3": (lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=32)), _ids()),
        "gpt-oss": (lambda: T.GptOssForCausalLM(T.GptOssConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=32, layer_types=["full_attention"])), _ids()),
        "jamba": (lambda: T.JambaForCausalLM(T.JambaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
            attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=4,
            use_mamba_kernels=False)), _ids()),
        "mamba2": (lambda: T.Mamba2ForCausalLM(T.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                              state_size=8, expand=2, n_groups=1, num_heads=4,
                                                              head_dim=16, chunk_size=8)), _ids()),
        "recurrent-gemma": (lambda: T.RecurrentGemmaForCausalLM(T.RecurrentGemmaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            lru_width=32, attention_window_size=16, block_types=["recurrent", "attention"], conv1d_width=4)),
            _ids()),
        "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**lm, num_key_value_heads=1, head_dim=16)), _ids()),
        "qwen2-moe": (lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            **lm, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32)), _ids()),
        "gemma3": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**lm, num_key_value_heads=1, head_dim=16,
                                                                  sliding_window=8)), _ids()),
        "granite": (lambda: T.GraniteForCausalLM(T.GraniteConfig(**lm)), _ids()),
        "persimmon": (lambda: T.PersimmonForCausalLM(T.PersimmonConfig(**lm)), _ids()),
        "olmo2": (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**lm)), _ids()),
        "zamba2": (lambda: T.Zamba2ForCausalLM(T.Zamba2Config(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8, layers_block_type=["mamba", "hybrid"],
            num_key_value_heads=2, max_position_embeddings=32)), _ids()),
        "falcon-mamba": (lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(vocab_size=64, hidden_size=32,
                                                                             num_hidden_layers=1, state_size=8)),
                         _ids()),
        "musicgen": (lambda: T.MusicgenForCausalLM(T.MusicgenDecoderConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, num_codebooks=2,
            max_position_embeddings=32)), lambda: {"input_ids": torch.randint(0, 64, (4, 7), generator=_gen())}),
        # encoders and encoder-decoders
        "modernbert": (lambda: T.ModernBertForMaskedLM(T.ModernBertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2)), _ids()),
        "layoutlm": (lambda: T.LayoutLMForMaskedLM(T.LayoutLMConfig(**lm)),
                     lambda: {**_ids()(), "bbox": torch.randint(0, 100, (2, 7, 4), generator=_gen()).sort(-1).values}),
        "marian": (lambda: T.MarianMTModel(T.MarianConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
            pad_token_id=0, decoder_start_token_id=0)),
            lambda: {**_ids()(), "decoder_input_ids": _ids(5)()["input_ids"]}),
        "speech2text": (lambda: T.Speech2TextForConditionalGeneration(T.Speech2TextConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=64,
            max_target_positions=32, num_conv_layers=1, conv_channels=16, input_feat_per_channel=8,
            conv_kernel_sizes=[5])),
            lambda: {"input_features": torch.randn(2, 16, 8, generator=_gen()), "decoder_input_ids": _ids(5)()["input_ids"]}),
        "patchtst": (lambda: T.PatchTSTForPrediction(T.PatchTSTConfig(
            num_input_channels=3, context_length=32, patch_length=8, patch_stride=8, prediction_length=8, d_model=16,
            num_hidden_layers=1, num_attention_heads=2, ffn_dim=32)),
            lambda: {"past_values": torch.randn(2, 32, 3, generator=_gen())}),
        "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32)), _ids()),
        "roberta": (lambda: T.RobertaForMaskedLM(T.RobertaConfig(**lm)), _ids()),
        "deberta-v2": (lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**lm)), _ids()),
        "electra": (lambda: T.ElectraForPreTraining(T.ElectraConfig(**lm, embedding_size=16)), _ids()),
        "convbert": (lambda: T.ConvBertForMaskedLM(T.ConvBertConfig(**lm, embedding_size=32)), _ids()),
        "mpnet": (lambda: T.MPNetForMaskedLM(T.MPNetConfig(**lm)), _ids()),
        "funnel": (lambda: T.FunnelForMaskedLM(T.FunnelConfig(vocab_size=64, d_model=32, n_head=2, d_head=16,
                                                              d_inner=64, block_sizes=[1, 1],
                                                              num_decoder_layers=1)), _ids()),
        "longformer": (lambda: T.LongformerForMaskedLM(T.LongformerConfig(**{**lm, "max_position_embeddings": 80},
                                                                          attention_window=4)), _ids(8)),
        "bigbird": (lambda: T.BigBirdForMaskedLM(T.BigBirdConfig(**lm, attention_type="original_full")), _ids()),
        "fnet": (lambda: T.FNetForMaskedLM(T.FNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                        intermediate_size=64, max_position_embeddings=32)), _ids()),
        "nystromformer": (lambda: T.NystromformerForMaskedLM(T.NystromformerConfig(**lm, segment_means_seq_len=8,
                                                                                   num_landmarks=4)), _ids(8)),
        "canine": (lambda: T.CanineModel(T.CanineConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=64, num_hash_buckets=64,
                                                        local_transformer_stride=4, downsampling_rate=4,
                                                        max_position_embeddings=64)),
                   lambda: {"input_ids": torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))}),
        "perceiver": (lambda: T.PerceiverForMaskedLM(T.PerceiverConfig(
            vocab_size=64, d_model=32, d_latents=32, num_latents=8, num_blocks=1, num_self_attends_per_block=1,
            num_self_attention_heads=2, num_cross_attention_heads=2, max_position_embeddings=16)),
                      lambda: {"inputs": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))}),
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)), _ids()),
        # vision, audio, multimodal
        "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16,
                                                                   depths=[1, 1], num_heads=[1, 2],
                                                                   window_size=4)), _pixels()),
        "deit": (lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**vit)), _pixels()),
        "beit": (lambda: T.BeitForImageClassification(T.BeitConfig(**vit, use_relative_position_bias=True)),
                 _pixels()),
        "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**vit)), _pixels()),
        "segformer": (lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16)), _pixels()),
        "mobilevit": (lambda: T.MobileViTForImageClassification(T.MobileViTConfig(
            image_size=32, patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
            num_attention_heads=2)), _pixels()),
        "regnet": (lambda: T.RegNetForImageClassification(T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                         depths=[1, 1], groups_width=8)), _pixels()),
        "mobilenetv2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=32,
                                                                                       depth_multiplier=0.25)),
                        _pixels()),
        "hubert": (lambda: T.HubertForCTC(T.HubertConfig(**audio)), _wave),
        "wavlm": (lambda: T.WavLMForCTC(T.WavLMConfig(**audio)), _wave),
        "sew": (lambda: T.SEWForCTC(T.SEWConfig(**audio, squeeze_factor=2)), _wave),
        "encodec": (lambda: T.EncodecModel(T.EncodecConfig(
            target_bandwidths=[8.0], sampling_rate=8000, audio_channels=1, hidden_size=16, num_filters=4,
            num_residual_layers=1, upsampling_ratios=[4, 2], codebook_size=16, codebook_dim=16, num_lstm_layers=1)),
            lambda: {"input_values": torch.randn(2, 1, 64, generator=_gen()), "bandwidth": 8.0}),
        "dac": (lambda: T.DacModel(T.DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 2],
                                               decoder_hidden_size=16, n_codebooks=2, codebook_size=16,
                                               codebook_dim=4, hidden_size=32)),
                lambda: {"input_values": torch.randn(2, 1, 64, generator=_gen())}),
        "hifigan": (lambda: T.SpeechT5HifiGan(T.SpeechT5HifiGanConfig(
            model_in_dim=16, upsample_initial_channel=16, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
            resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])),
            lambda: {"spectrogram": torch.randn(2, 9, 16, generator=_gen())}),
        "univnet": (lambda: T.UnivNetModel(T.UnivNetConfig(
            model_in_channels=8, model_hidden_channels=8, num_mel_bins=16, resblock_kernel_sizes=[3],
            resblock_stride_sizes=[2], resblock_dilation_sizes=[[1, 3]], kernel_predictor_num_blocks=1,
            kernel_predictor_hidden_channels=8)),
            lambda: {"input_features": torch.randn(2, 9, 16, generator=_gen()),
                     "noise_sequence": torch.randn(2, 9, 8, generator=_gen(1))}),
        "dpt": (lambda: T.DPTForDepthEstimation(T.DPTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=64, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
            backbone_out_indices=[0, 1, 2, 3])), _pixels()),
        "convnextv2": (lambda: T.ConvNextV2ForImageClassification(T.ConvNextV2Config(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)), _pixels()),
        "levit": (lambda: T.LevitForImageClassification(T.LevitConfig(
            image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
            key_dim=[8, 8, 8])), _pixels()),
        "pix2struct": (lambda: T.Pix2StructForConditionalGeneration(T.Pix2StructConfig(
            text_config=dict(vocab_size=64, hidden_size=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2),
            vision_config=dict(hidden_size=32, patch_embed_hidden_size=48, d_ff=64, d_kv=16, num_hidden_layers=1,
                               num_attention_heads=2, seq_len=16))), _patches),
        "blip": (lambda: T.BlipForConditionalGeneration(T.BlipConfig(
            text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=32, encoder_hidden_size=32),
            vision_config=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64))), both),
        # added 2026-12-07 (second batch)
        "switch-transformers": (lambda: T.SwitchTransformersForConditionalGeneration(T.SwitchTransformersConfig(
            vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
            num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=8)), dec),
        "nllb-moe": (lambda: T.NllbMoeForConditionalGeneration(T.NllbMoeConfig(**s2s, num_experts=4,
            expert_capacity=8, encoder_sparse_step=1, decoder_sparse_step=1)), dec),
        "m2m100": (lambda: T.M2M100ForConditionalGeneration(T.M2M100Config(**s2s)), dec),
        "pegasus": (lambda: T.PegasusForConditionalGeneration(T.PegasusConfig(**s2s)), dec),
        "led": (lambda: T.LEDForConditionalGeneration(T.LEDConfig(**{**s2s, "max_position_embeddings": 64},
            max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, attention_window=[4])),
            lambda: {**_ids(8)(), "decoder_input_ids": _ids(5)()["input_ids"]}),
        "prophetnet": (lambda: T.ProphetNetForConditionalGeneration(T.ProphetNetConfig(vocab_size=64, hidden_size=32,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1,
            num_encoder_attention_heads=2, num_decoder_attention_heads=2, max_position_embeddings=32, ngram=2)), dec),
        "mt5": (lambda: T.MT5ForConditionalGeneration(T.MT5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64,
            num_layers=1, num_heads=2)), dec),
        "squeezebert": (lambda: T.SqueezeBertForMaskedLM(T.SqueezeBertConfig(**lm, embedding_size=32)), _ids()),
        "mobilebert": (lambda: T.MobileBertForMaskedLM(T.MobileBertConfig(**lm, embedding_size=16,
            intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2)), _ids()),
        "xlm-roberta": (lambda: T.XLMRobertaForMaskedLM(T.XLMRobertaConfig(**lm)), _ids()),
        "esm": (lambda: T.EsmForMaskedLM(T.EsmConfig(**lm, pad_token_id=1, mask_token_id=2,
            position_embedding_type="rotary")), _ids()),
        "wav2vec2-conformer": (lambda: T.Wav2Vec2ConformerForCTC(T.Wav2Vec2ConformerConfig(**audio,
            position_embeddings_type="relative", conv_depthwise_kernel_size=3)), _wave),
        "data2vec-audio": (lambda: T.Data2VecAudioForCTC(T.Data2VecAudioConfig(**audio, conv_pos_kernel_size=3)),
                           _wave),
        "unispeech-sat": (lambda: T.UniSpeechSatForCTC(T.UniSpeechSatConfig(**audio)), _wave),
        "detr": (lambda: T.DetrForObjectDetection(T.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
            backbone_config=T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"]),
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5)), _pixels()),
        "upernet": (lambda: T.UperNetForSemanticSegmentation(T.UperNetConfig(
            backbone_config=T.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                             out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=16, auxiliary_channels=8, num_labels=3)), _pixels()),
        "videomae": (lambda: T.VideoMAEForVideoClassification(T.VideoMAEConfig(image_size=16, patch_size=8,
            num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, num_labels=3)),
            lambda: {"pixel_values": torch.randn(2, 4, 3, 16, 16, generator=_gen())}),
        "sam": (lambda: T.SamModel(T.SamConfig(
            vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8, mlp_dim=64, window_size=2, global_attn_indexes=[0],
                               num_pos_feats=8),
            prompt_encoder_config=dict(hidden_size=16, image_size=32, patch_size=8, mask_input_channels=4),
            mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                     iou_head_hidden_dim=16))),
            lambda: {"pixel_values": torch.randn(1, 3, 32, 32, generator=_gen()),
                     "input_points": torch.rand(1, 1, 1, 2, generator=_gen()) * 32}),
        "clap": (lambda: T.ClapModel(T.ClapConfig(
            text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=32, projection_dim=16),
            audio_config=dict(spec_size=32, patch_size=4, num_mel_bins=32, window_size=2, depths=[1, 1],
                              num_attention_heads=[1, 2], patch_embeds_hidden_size=16, hidden_size=32,
                              projection_dim=16, enable_fusion=False, num_classes=3), projection_dim=16)),
            lambda: {**_ids()(), "input_features": torch.randn(2, 1, 32, 32, generator=_gen())}),
        "paligemma": (lambda: T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
            vision_config=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, projection_dim=32),
            text_config=dict(model_type="gemma", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, head_dim=16),
            image_token_index=63, projection_dim=32)),
            _with_image_tokens()),
        "timesformer": (lambda: T.TimesformerForVideoClassification(T.TimesformerConfig(image_size=16, patch_size=8,
            num_frames=2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            num_labels=3)), lambda: {"pixel_values": torch.randn(2, 2, 3, 16, 16, generator=_gen())}),
        # added 2026-12-07 (third batch)
        "git": (lambda: T.GitForCausalLM(T.GitConfig(vision_config=vis, **lm, num_image_with_embedding=None)),
                lambda: {**_ids()(), "pixel_values": torch.randn(2, 3, 16, 16, generator=_gen())}),
        "blip-2": (lambda: T.Blip2ForConditionalGeneration(T.Blip2Config(
            vision_config=vis, qformer_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32),
            text_config=dict(model_type="opt", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64),
            num_query_tokens=4, image_token_index=63)),
            _with_image_tokens()),
        "kosmos2": (lambda: T.Kosmos2ForConditionalGeneration(T.Kosmos2Config(
            text_config=dict(vocab_size=64, embed_dim=32, layers=1, attention_heads=2, ffn_dim=64,
                             max_position_embeddings=64),
            vision_config=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64), latent_query_num=4)),
            lambda: {**_ids(8)(), "pixel_values": torch.randn(2, 3, 16, 16, generator=_gen()),
                     "image_embeds_position_mask": torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]] * 2).bool()}),
        "idefics3": (lambda: T.Idefics3ForConditionalGeneration(T.Idefics3Config(
            vision_config=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64),
            text_config=dict(model_type="llama", **lm, pad_token_id=0), image_token_id=63, scale_factor=1)),
            lambda: {"input_ids": torch.cat([torch.full((1, 4), 63), _ids(5)()["input_ids"][:1] % 60], 1),
                     "pixel_values": torch.randn(1, 1, 3, 16, 16, generator=_gen(1))}),
        "gemma3-mm": (lambda: T.Gemma3ForConditionalGeneration(T.Gemma3Config(
            vision_config=dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64),
            text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64, head_dim=16, sliding_window=8),
            mm_tokens_per_image=4, image_token_index=63, boi_token_index=61, eoi_token_index=62)),
            _with_image_tokens()),
        "fastspeech2": (lambda: T.FastSpeech2ConformerModel(T.FastSpeech2ConformerConfig(vocab_size=64,
            hidden_size=32, encoder_layers=1, decoder_layers=1, encoder_num_attention_heads=2,
            decoder_num_attention_heads=2, num_mel_bins=8, speech_decoder_postnet_units=16,
            speech_decoder_postnet_layers=2, duration_predictor_channels=16, pitch_predictor_channels=16,
            energy_predictor_channels=16, encoder_linear_units=64, decoder_linear_units=64,
            positionwise_conv_kernel_size=3)), lambda: {"input_ids": torch.randint(1, 64, (1, 7), generator=_gen())}),
        "clip": (lambda: T.CLIPModel(T.CLIPConfig(**text_vision)), both),
        "siglip": (lambda: T.SiglipModel(T.SiglipConfig(**text_vision)), both),
        "llava": (lambda: T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", image_size=16, patch_size=8, hidden_size=32,
                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
            text_config=dict(model_type="llama", **lm), image_token_index=63, vision_feature_layer=-1)),
                  _with_image_tokens()),
    }


def _main_output(out):
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "logits_per_image", "last_hidden_state", "audio_values", "waveform",
                 "prediction_outputs", "predicted_depth"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


def run_one(build, inputs) -> dict:
    import roastfx
    import roastfx.passes.fuse_roast_ops as fuse_pass

    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs = inputs()
    dense = build().eval()  # the same steps as the compressed model's below, dense
    outputs = []
    for how, run in (("eager", lambda m: m), ("under torch.compile (backend='aot_eager')",
                                              lambda m: torch.compile(m, backend="aot_eager"))):
        try:
            outputs.append(_main_output(run(dense)(**kwargs)).float())
            outputs[-1].square().mean().backward()
        except Exception as err:  # noqa: BLE001 (the dense model itself: reported, not ours)
            return {"dense_fails": f"{how}: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    torch._dynamo.reset()
    gap = (outputs[1] - outputs[0]).abs().max().item() if outputs[0].shape == outputs[1].shape else float("inf")
    if gap > 1e-4 * max(1.0, outputs[0].abs().max().item()):
        return {"dense_fails": f"under torch.compile: its output differs from eager by {gap:.3g}, so the compressed "
                               "model's would too"}
    model = roastfx.compress(build().eval(), "4x", init="random", example_inputs=kwargs)
    eager = _main_output(model(**kwargs))
    eager.float().square().mean().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    uses, original = [], fuse_pass.fuse_roast_ops

    def recording(gm):
        found = original(gm)
        uses.extend(found)
        return found

    fuse_pass.fuse_roast_ops = recording
    try:
        out = _main_output(torch.compile(model, backend="roast", options={"inner": "aot_eager"})(**kwargs))
        out.float().square().mean().backward()
    finally:
        fuse_pass.fuse_roast_ops = original
    scale = grad.norm().item()
    return {"sites": len(roastfx.roast_state(model).plan.sites), "fused": sum(u.fused for u in uses),
            "reads": len(uses), "out_err": (out - eager).abs().max().item(),
            "grad_err": (model.roast_memory.grad - grad).norm().item() / scale if scale else 0.0,
            "fallbacks": sorted({u.why for u in uses if not u.fused})}


def main(argv=None) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    table = cases()
    names = (argv if argv is not None else sys.argv[1:]) or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {list(table)}", file=sys.stderr)
        return 2
    print(f"{'model':<14}{'sites':>6}{'fused':>10}{'out diff':>11}{'grad rel diff':>15}")
    failed = 0
    for name in names:
        try:
            r = run_one(*table[name])
        except Exception as err:  # noqa: BLE001 (one model failing must not stop the sweep)
            failed += 1
            print(f"{name:<14}FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
            traceback.print_exc(limit=-3)
            continue
        if "dense_fails" in r:
            print(f"{name:<14}the dense model fails {r['dense_fails']}", flush=True)
            continue
        print(f"{name:<14}{r['sites']:>6}{r['fused']:>6} / {r['reads']:<3}{r['out_err']:>9.1e}{r['grad_err']:>15.1e}",
              flush=True)
        for why in r["fallbacks"]:
            print(f"{'':<16}materialized: {why}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
