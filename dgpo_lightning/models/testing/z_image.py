"""A tiny random Z-Image pipeline (``ZImagePipeline``), built offline in code.

Architecture as in Z-Image / Z-Image-Turbo, widths tiny: a Qwen3 text encoder (``Qwen3Model``, as
the published ``text_encoder``) behind a byte-level BPE ``Qwen2Tokenizer`` learnt from a few
sentences with Qwen3's chat template, a ``ZImageTransformer2DModel`` (noise refiner, context
refiner, main layers, 2x2 patches), a 16-channel FLUX-style VAE without quant convs (the published
``scaling_factor`` 0.3611 and ``shift_factor`` 0.1159) and Z-Image-Turbo's published scheduler
config (``FlowMatchEulerDiscreteScheduler``, ``shift`` 3, no dynamic shifting). The VAE downsamples
by 2, so 32 px images have 16x16 latents (64 image tokens).
"""

from __future__ import annotations

from typing import Sequence

import torch

from dgpo_lightning.models.testing import (
    DEFAULT_CORPUS,
    eval_components,
    qwen2_tokenizer,
    tiny_autoencoder_kl,
    trained_bpe_vocab_and_merges,
)

#: Widths of the tiny Z-Image.
TINY_Z_IMAGE = {
    "text_hidden": 16,
    "dim": 32,
    "latent_channels": 16,
    "resolution": 32,
}

#: Qwen3's chat template (the parts ``ZImagePipeline._encode_prompt`` uses: user turns, the
#: generation prompt, and the ``enable_thinking=False`` empty think block; the pipeline passes
#: ``enable_thinking=True``, which adds nothing after ``<|im_start|>assistant\n``).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_qwen2_tokenizer(corpus: Sequence[str] = DEFAULT_CORPUS, vocab_size: int = 400):
    """A ``Qwen2Tokenizer`` (byte-level BPE, Qwen's pre-tokenizer) whose merges are learnt from
    ``corpus`` by the ``tokenizers`` trainer, with Qwen's special tokens (``<|endoftext|>`` as pad /
    eos, ``<|im_start|>``, ``<|im_end|>``) and :data:`QWEN3_CHAT_TEMPLATE`. Every byte is in the
    vocabulary, so any text tokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    vocab, merges = trained_bpe_vocab_and_merges(bpe, trainer, list(corpus) + [line.lower() for line in corpus])
    tokenizer = qwen2_tokenizer(vocab, merges, ["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_z_image(seed: int = 0, scheduler_config: dict | None = None):
    """A ``ZImagePipeline`` with tiny random components (module docstring), built offline.

    ``scheduler_config`` overrides Z-Image-Turbo's scheduler settings (e.g.
    ``{"use_dynamic_shifting": True}`` for a resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    sizes = TINY_Z_IMAGE
    tokenizer = build_qwen2_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=sizes["text_hidden"],
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=sizes["latent_channels"],
        dim=sizes["dim"],
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=sizes["text_hidden"],
        axes_dims=[8, 4, 4],  # sums to the head dim 16
        axes_lens=[1024, 32, 32],  # caption positions up to max_sequence_length + 32
    )
    with torch.no_grad():
        # Created with torch.empty: give the pad tokens values (and make them matter in tests).
        transformer.x_pad_token.normal_(0.0, 0.5)
        transformer.cap_pad_token.normal_(0.0, 0.5)
        # The final layer's adaLN and linear are random here (zero-initialised in training code),
        # so the velocity depends on the inputs.
    torch.manual_seed(seed + 2)
    vae = tiny_autoencoder_kl(sizes["latent_channels"], sizes["resolution"], scaling_factor=0.3611, shift_factor=0.1159)
    # Z-Image-Turbo's published scheduler/scheduler_config.json.
    config = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
    config.update(scheduler_config or {})
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return eval_components(pipe, quiet=True)


__all__ = ["QWEN3_CHAT_TEMPLATE", "TINY_Z_IMAGE", "build_qwen2_tokenizer", "build_tiny_z_image"]
