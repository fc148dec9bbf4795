"""Tiny random stand-ins for the real models, built offline in code (tests, notebooks, CI).

Nothing here touches a hub: the tokenizers are built from a few sentences (a byte-level BPE vocabulary
for CLIP, a unigram vocabulary for T5) and every network is a randomly initialised diffusers /
transformers model of the right *architecture* with tiny widths. The real SD3 code path (three text
encoders, MMDiT transformer, 16-channel VAE with scaling and shift factors, LoRA save/load) therefore
runs end to end on a CPU in a second.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Sequence

import torch

#: A few sentences the tiny tokenizers learn their vocabulary from (GenEval/OCR-style prompts).
DEFAULT_CORPUS: tuple[str, ...] = (
    "a photo of a cat",
    "a photo of a dog and a red apple",
    "a photo of two blue cars",
    "a green bench to the left of a yellow umbrella",
    'a sign that says "hello world" in bold letters',
    'a poster with the text "open" written on it',
    "a realistic photo of an astronaut riding a horse",
    "three purple birds on a white table",
)

#: Widths of the tiny SD3. The two CLIP hidden sizes add up to the T5 width, as in SD3 (768 + 1280
#: < 4096, zero-padded there; equal here, so no padding and no truncation happens).
TINY_SD3 = {
    "clip_hidden": 16,
    "clip_projection": 16,
    "t5_width": 32,
    "latent_channels": 16,
    "resolution": 32,
}


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _words(corpus: Sequence[str]) -> list[str]:
    import re

    return [w for line in corpus for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", line.lower())]


def greedy_bpe_merges(
    counts: collections.Counter, words: dict[str, list[str]], num_merges: int
) -> list[tuple[str, str]]:
    """Greedy byte-pair merges: ``words`` maps each word (counted ``counts[word]`` times) to its
    initial symbols; the most frequent adjacent pair is merged ``num_merges`` times (ties broken
    alphabetically, so the result is deterministic). ``words`` is updated in place."""
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for word, symbols in words.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in words.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[word] = merged
    return merges


def learn_bpe_merges(corpus: Sequence[str], num_merges: int = 64) -> list[tuple[str, str]]:
    """Greedy byte-pair merges learnt from ``corpus`` with CLIP's ``</w>`` end-of-word marker: each
    word starts as its characters, the last one carrying ``</w>`` (:func:`greedy_bpe_merges`)."""
    counts = collections.Counter(_words(corpus))
    return greedy_bpe_merges(counts, {w: list(w[:-1]) + [w[-1] + "</w>"] for w in counts}, num_merges)


def trained_bpe_vocab_and_merges(backend, trainer, corpus: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the ``tokenizers`` BPE ``backend`` with ``trainer`` on ``corpus``; its vocabulary and merges
    (serialised as pairs, or as ``"a b"`` strings by older ``tokenizers``)."""
    import json

    backend.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def qwen2_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]], special_tokens: Sequence[str], **kwargs):
    """A ``Qwen2Tokenizer`` (byte-level BPE with Qwen's pre-tokenizer) over ``vocab`` / ``merges``, with
    ``special_tokens`` added as special, unnormalised tokens (as Qwen's released tokenizers have them)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges), **kwargs)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in special_tokens]}
    )
    return tokenizer


def build_clip_tokenizer(corpus: Sequence[str] = DEFAULT_CORPUS, num_merges: int = 64, model_max_length: int = 77):
    """A ``CLIPTokenizer`` with a small byte-level BPE vocabulary (every byte, with and without
    ``</w>``, plus the merges learnt from ``corpus``), so any text tokenizes without an unknown token.
    """
    from transformers import CLIPTokenizer

    merges = learn_bpe_merges(corpus, num_merges)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(corpus: Sequence[str] = DEFAULT_CORPUS):
    """A ``T5Tokenizer`` (tokenizers' unigram model) whose pieces are the corpus words, single
    characters and the ``▁`` word-start marker; scores are log frequencies, so known words win."""
    from transformers import T5Tokenizer

    counts = collections.Counter(_words(corpus))
    total = sum(counts.values())
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, math.log(n / total)) for w, n in sorted(counts.items())]
    vocab += [(c, -12.0) for c in chars] + [("▁" + c, -12.5) for c in chars if c not in counts]
    vocab = list({piece: score for piece, score in vocab}.items())
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_clip_text_config(tokenizer, hidden_size: int = 16, projection_dim: int = 16):
    """A tiny ``CLIPTextConfig`` matched to ``tokenizer`` (vocabulary, special ids)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size + 5,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_t5_encoder(tokenizer, width: int):
    """A tiny random ``T5EncoderModel`` (2 layers, 4 heads of 8, gated GELU) of width ``width``
    matched to ``tokenizer`` (vocabulary, pad / eos ids); seeded by the caller."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**tiny_t5_config(tokenizer, width)))


def tiny_t5_config(tokenizer, width: int) -> dict:
    """The tiny T5-family encoder config (2 layers, 4 heads of 8, gated GELU) shared by the T5 and
    UMT5 stand-ins, matched to ``tokenizer``."""
    return dict(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def tiny_autoencoder_kl(latent_channels: int, resolution: int, scaling_factor: float, shift_factor: float):
    """A tiny random ``AutoencoderKL`` (two stages: downsamples by 2; no quant convs, as SD3 / FLUX)
    with the given latent channels and VAE scaling / shift; seeded by the caller."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=resolution,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def eval_components(pipe, quiet: bool = False):
    """Put every network of ``pipe`` in eval mode (``quiet``: and turn its progress bar off); returns ``pipe``."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` with tiny random components, built offline.

    Architecture as in SD3.5-Medium (MMDiT with QK RMS-norm and a dual-attention block, CLIP-L/G
    with projection, T5 encoder, 16-channel VAE without quant convs, SD3's VAE scaling 1.5305 and
    shift 0.0609, flow-matching Euler scheduler with shift 3), widths tiny. The VAE downsamples by
    2, so the default 32 px images have 16x16 latents (64 transformer tokens with patch size 2).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    sizes = TINY_SD3
    tokenizer = build_clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(
        tiny_clip_text_config(tokenizer, sizes["clip_hidden"], sizes["clip_projection"])
    )
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_text_config(tokenizer, sizes["clip_hidden"], sizes["clip_projection"])
    )
    torch.manual_seed(seed + 2)
    text_encoder_3 = tiny_t5_encoder(tokenizer_3, sizes["t5_width"])
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=sizes["resolution"] // 2,
        patch_size=2,
        in_channels=sizes["latent_channels"],
        out_channels=sizes["latent_channels"],
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=sizes["t5_width"],
        caption_projection_dim=16,
        pooled_projection_dim=2 * sizes["clip_projection"],
        pos_embed_max_size=32,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    torch.manual_seed(seed + 4)
    vae = tiny_autoencoder_kl(sizes["latent_channels"], sizes["resolution"], scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return eval_components(pipe)


def save_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> Path:
    """Write a tiny random ``CLIPModel`` and its ``CLIPProcessor`` to ``directory`` (for the
    CLIP-family rewards: PickScore, Aesthetic, CLIPScore). Returns ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    directory = Path(directory)
    tokenizer = build_clip_tokenizer()
    text = tiny_clip_text_config(tokenizer, hidden_size=16, projection_dim=projection_dim)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim))
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def save_tiny_mask2former(
    directory: str | Path,
    labels: Sequence[str] = ("cat", "dog", "mouse", "remote"),
    seed: int = 0,
    num_queries: int = 6,
    shortest_edge: int = 64,
    longest_edge: int = 96,
) -> Path:
    """Write a tiny random Mask2Former instance-segmentation checkpoint (Swin backbone, class names
    ``labels``) and its image-processor config to ``directory`` (for the GenEval detector). Returns it.

    The weights have ``Mask2FormerForUniversalSegmentation``'s parameter names; the model is built
    through the detector's inference head, as that class's constructor needs scipy for its loss.
    """
    import json

    from transformers import Mask2FormerConfig, Mask2FormerImageProcessorPil, SwinConfig

    from dgpo_lightning.models.mask2former import instance_head_class

    directory = Path(directory)
    backbone = SwinConfig(
        image_size=shortest_edge,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,  # the pixel decoder's GroupNorm has 32 groups
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=num_queries,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = instance_head_class()(config)
    with torch.no_grad():  # away from the identity, so that tests see where each norm layer applies
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    config_file = directory / "config.json"  # label it as the transformers class whose weights it mirrors
    saved = json.loads(config_file.read_text())
    saved["architectures"] = ["Mask2FormerForUniversalSegmentation"]
    config_file.write_text(json.dumps(saved, indent=2))
    processor = Mask2FormerImageProcessorPil(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}, size_divisor=32
    )
    processor.save_pretrained(directory)
    return directory


#: A tiny open_clip CLIP architecture (open_clip's config-dict format) for tests of the open_clip rewards.
TINY_OPEN_CLIP_CONFIG: dict = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}


def save_tiny_open_clip(path: str | Path, seed: int = 0, wrap: str | None = None) -> Path:
    """Write the state dict of a random ``open_clip.CLIP`` of :data:`TINY_OPEN_CLIP_CONFIG` to ``path``.

    ``wrap="state_dict"`` saves ``{"state_dict": {"module.<key>": ...}}``, the layout of training
    checkpoints such as HPS's; ``None`` saves the bare state dict. Returns ``path``."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CONFIG)
    with torch.no_grad():  # open_clip initialises some projections at zero-ish scales: spread them
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    state = model.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": {f"module.{key}": value for key, value in state.items()}}
    path = Path(path)
    torch.save(state, path)
    return path
