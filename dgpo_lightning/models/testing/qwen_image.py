"""A tiny random Qwen-Image pipeline, built offline in code (tests, notebooks, CI).

Every part has the architecture of Qwen/Qwen-Image with tiny widths: a ``Qwen2_5_VLForConditionalGeneration``
text encoder (2 layers, width 16, multimodal RoPE), a byte-level BPE ``Qwen2Tokenizer`` learnt here
from a few sentences plus Qwen-Image's prompt template, a ``QwenImageTransformer2DModel`` (2 dual-stream
blocks), an ``AutoencoderKLQwenImage`` (causal 3-D convolutions, per-channel ``latents_mean`` /
``latents_std``) and the ``FlowMatchEulerDiscreteScheduler`` configured as Qwen-Image's published
``scheduler/scheduler_config.json`` (dynamic exponential shifting, ``max_shift`` 0.9,
``max_image_seq_len`` 8192, ``shift_terminal`` 0.02).
"""

from __future__ import annotations

import collections
from typing import Sequence

import torch

from dgpo_lightning.models.testing import DEFAULT_CORPUS, eval_components, greedy_bpe_merges, qwen2_tokenizer

#: Qwen-Image's scheduler config (``Qwen/Qwen-Image`` ``scheduler/scheduler_config.json``; the same
#: values are reproduced by several public trainers, e.g. ostris/ai-toolkit and SimpleTuner).
QWEN_IMAGE_SCHEDULER_CONFIG: dict = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

#: Widths of the tiny Qwen-Image. ``latent_channels`` is ``z_dim`` (16 in the real model); the
#: transformer sees 2x2-packed tokens of ``4 * latent_channels`` features.
TINY_QWEN_IMAGE = {
    "text_hidden": 16,
    "latent_channels": 4,
    "resolution": 32,
}

#: Special tokens of Qwen2.5-VL's tokenizer that the pipeline's template (and the VL config) name.
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


#: ``QwenImagePipeline.prompt_template_encode`` (diffusers 0.42): the chat template the prompt is
#: encoded in. The tokenizer learns its words, so its 34-token system prefix tokenizes as with Qwen2's
#: vocabulary (tests check this against the pipeline's own attribute).
QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _pretokenize(tokenizer, text: str) -> list[str]:
    import re

    pieces = re.split("|".join(re.escape(t) for t in (*QWEN_SPECIAL_TOKENS, "<|endoftext|>")), text)
    words: list[str] = []
    for piece in pieces:
        if piece:
            words += [w for w, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(piece)]
    return words


def learn_byte_level_merges(words: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over byte-level pre-tokenized ``words`` (GPT-2/Qwen style, no end-of-word
    marker); ties broken alphabetically so the result is deterministic."""
    counts = collections.Counter(words)
    return greedy_bpe_merges(counts, {w: list(w) for w in counts}, num_merges)


def build_qwen2_tokenizer(corpus: Sequence[str] = DEFAULT_CORPUS, num_merges: int = 400):
    """A ``Qwen2Tokenizer`` with a small byte-level BPE vocabulary: every byte, the merges learnt from
    ``corpus`` and from Qwen-Image's prompt template, and Qwen2.5-VL's special tokens.

    Enough merges are learnt that each word of the template is one token, as with the real Qwen2
    vocabulary, so the template's system prefix is exactly the 34 tokens that
    ``QwenImagePipeline.prompt_template_encode_start_idx`` drops. Any text still tokenizes (bytes).
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    probe = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])
    words = _pretokenize(probe, QWEN_IMAGE_PROMPT_TEMPLATE.format(""))
    for line in corpus:
        words += _pretokenize(probe, line)
    merges = learn_byte_level_merges(words, num_merges)
    tokens = ["<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), *(a + b for a, b in merges)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return qwen2_tokenizer(vocab, merges, QWEN_SPECIAL_TOKENS, model_max_length=32768)


def build_tiny_qwen2_5_vl(tokenizer, hidden_size: int = 16, seed: int = 0):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` matched to ``tokenizer`` (its vocabulary
    and vision token ids); the vision tower is built but never used for text prompts."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size + 5,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": len(tokenizer),
            # head_dim 8: the multimodal RoPE sections (temporal, height, width) sum to head_dim / 2.
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "max_position_embeddings": 2048,
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden_size},
        hidden_size=hidden_size,
        vocab_size=len(tokenizer),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        image_token_id=ids("<|image_pad|>"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image(seed: int = 0):
    """A ``QwenImagePipeline`` with tiny random components, built offline (no hub).

    The VAE downsamples by 2 (one spatial stage), so the default 32 px images have ``[4, 16, 16]``
    latents and 64 transformer tokens after 2x2 packing. ``latents_mean`` / ``latents_std`` are set
    away from 0 / 1 so that tests see where the normalisation applies.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    sizes = TINY_QWEN_IMAGE
    z_dim = sizes["latent_channels"]
    tokenizer = build_qwen2_tokenizer()
    text_encoder = build_tiny_qwen2_5_vl(tokenizer, sizes["text_hidden"], seed=seed)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=sizes["text_hidden"],
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[-0.3, 0.2, 0.5, -0.1][:z_dim],
        latents_std=[1.5, 0.8, 2.0, 1.2][:z_dim],
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return eval_components(pipe, quiet=True)


__all__ = [
    "QWEN_IMAGE_PROMPT_TEMPLATE",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "TINY_QWEN_IMAGE",
    "build_qwen2_tokenizer",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen_image",
    "learn_byte_level_merges",
]
