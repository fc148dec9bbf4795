"""A tiny random SANA (``SanaPipeline``) built offline: Gemma tokenizer, Gemma-2 encoder, linear-attention
DiT, DC-AE, flow DPM-Solver scheduler, all with tiny widths and random weights (no hub access)."""

from __future__ import annotations

from typing import Sequence

import torch

from dgpo_lightning.models.testing import DEFAULT_CORPUS, eval_components, trained_bpe_vocab_and_merges

#: SANA's DC-AE (``mit-han-lab/dc-ae-f32c32-sana-1.0``) latent scaling factor, as in its config.
SANA_VAE_SCALING_FACTOR = 0.41407

#: Widths of the tiny SANA. The VAE downsamples by 4 (three stages), so 32 px images have 8x8
#: latents with SANA's 32 channels (patch size 1: 64 transformer tokens).
TINY_SANA = {
    "gemma_hidden": 16,
    "latent_channels": 32,
    "resolution": 32,
    "vae_channels": (8, 16, 32),
}

#: Gemma's special tokens in Gemma's id order (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4).
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def build_gemma_tokenizer(corpus: Sequence[str] | None = None, vocab_size: int = 600):
    """A ``GemmaTokenizerFast`` whose BPE model is trained offline on ``corpus`` by the tokenizers library.

    The layout is Gemma's: the five special tokens first (``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2,
    ``<unk>`` = 3, ``<mask>`` = 4), then the 256 byte-fallback pieces ``<0x00>``..``<0xFF>`` (so any
    text, e.g. SANA's upper-case complex human instruction, tokenizes without ``<unk>``), then the
    learnt pieces, with spaces as ``▁`` and no pre-tokenization (Gemma's normalizer and splitter).
    ``<bos>`` is prepended, as Gemma does. The default corpus is the package's test prompts plus
    ``SanaPipeline``'s complex human instruction, so that the instruction (prepended to every prompt)
    takes a few hundred tokens rather than one per character, as with Gemma's real vocabulary.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizerFast

    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    if corpus is None:
        from dgpo_lightning.models.sana import pipeline_complex_human_instruction

        corpus = [*DEFAULT_CORPUS, *pipeline_complex_human_instruction()]
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()▁")
    trainer = trainers.BpeTrainer(
        vocab_size=len(GEMMA_SPECIAL_TOKENS) + len(byte_pieces) + vocab_size,
        special_tokens=[*GEMMA_SPECIAL_TOKENS, *byte_pieces],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    vocab, merges = trained_bpe_vocab_and_merges(backend, trainer, corpus)
    return GemmaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def build_tiny_sana(seed: int = 0, scheduler: str = "dpm"):
    """A ``SanaPipeline`` with tiny random components, built offline.

    Architecture as in SANA 1.0 (``Efficient-Large-Model/Sana_1600M_1024px_diffusers``): a Gemma-2
    text encoder (``Gemma2Model``, the class the pipeline loads), the linear-attention
    ``SanaTransformer2DModel`` (patch size 1, no positional embedding, cross-attention to the caption,
    GLU-MBConv feed-forward), the 32-channel DC-AE ``AutoencoderDC`` with SANA's scaling factor
    0.41407, and SANA's published scheduler: ``DPMSolverMultistepScheduler`` with flow sigmas,
    ``flow_prediction`` and ``flow_shift=3`` (``scheduler="euler"``: a ``FlowMatchEulerDiscreteScheduler``
    with ``shift=3`` instead, for comparisons with the package's Euler sampler). Widths tiny
    (:data:`TINY_SANA`).
    """
    from diffusers import (
        AutoencoderDC,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model

    sizes = TINY_SANA
    tokenizer = build_gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=sizes["gemma_hidden"],
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=2048,
            sliding_window=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    side = sizes["resolution"] // 2 ** (len(sizes["vae_channels"]) - 1)
    transformer = SanaTransformer2DModel(
        in_channels=sizes["latent_channels"],
        out_channels=sizes["latent_channels"],
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=sizes["gemma_hidden"],
        mlp_ratio=2.5,
        sample_size=side,
        patch_size=1,
    )
    torch.manual_seed(seed + 2)
    blocks = len(sizes["vae_channels"])
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=sizes["latent_channels"],
        attention_head_dim=8,
        encoder_block_types=("ResBlock",) * (blocks - 1) + ("EfficientViTBlock",),
        decoder_block_types=("ResBlock",) * (blocks - 1) + ("EfficientViTBlock",),
        encoder_block_out_channels=sizes["vae_channels"],
        decoder_block_out_channels=sizes["vae_channels"],
        encoder_layers_per_block=(1,) * blocks,
        decoder_layers_per_block=(1,) * blocks,
        encoder_qkv_multiscales=((),) * (blocks - 1) + ((5,),),
        decoder_qkv_multiscales=((),) * (blocks - 1) + ((5,),),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=SANA_VAE_SCALING_FACTOR,
    )
    if scheduler == "dpm":
        noise_scheduler = DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
        )
    elif scheduler == "euler":
        noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"scheduler must be 'dpm' or 'euler', got {scheduler!r}")
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=noise_scheduler
    )
    return eval_components(pipe)


__all__ = ["SANA_VAE_SCALING_FACTOR", "TINY_SANA", "build_gemma_tokenizer", "build_tiny_sana"]
