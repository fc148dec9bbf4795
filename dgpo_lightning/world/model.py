"""The embedded world's text encoder: a word-level transformer over the world's vocabulary.

The world's prompts are built from a few dozen words (GenEval's templates over the world's classes,
colours, counts and relations), so a word-level tokenizer with a fixed vocabulary replaces a BPE
tokenizer: every prompt the world can render tokenizes exactly, and unknown words map to ``[unk]``.

A sequence is ``[bos] w_1 ... w_n [pad] ...`` of fixed length ``max_length``. The ``[bos]`` token
makes even the empty prompt (the CFG unconditional input) a non-empty sequence, so attention masks
never mask out a whole row.

The encoder is ``token embedding + learned position embedding → N pre-norm transformer layers →
LayerNorm`` and returns hidden states ``[B, L, D]`` that the UNet cross-attends to. It is a diffusers
``ModelMixin`` + ``ConfigMixin`` so it saves/loads with ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from dgpo_lightning.world.scene import CLASSES, COLORS, PLURALS, RELATIONS

PAD, UNK, BOS = "[pad]", "[unk]", "[bos]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS)
#: GenEval's template words and the number words (counts up to four are used by the prompt files;
#: the rest keep the vocabulary stable if counts grow).
TEMPLATE_WORDS: tuple[str, ...] = ("a", "an", "photo", "of", "and")
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def world_vocabulary() -> list[str]:
    """Special tokens, then every word of the world's prompt templates (sorted, deduplicated)."""
    words = set(TEMPLATE_WORDS) | set(NUMBER_WORDS) | set(CLASSES) | set(PLURALS.values()) | set(COLORS)
    for relation in RELATIONS:
        words.update(relation.split())
    return list(SPECIAL_TOKENS) + sorted(words)


_WORD = re.compile(r"[a-z]+")


def split_words(prompt: str) -> list[str]:
    """Lower-cased alphabetic words of ``prompt`` (punctuation and digits are dropped)."""
    return _WORD.findall(prompt.lower())


class WorldTextEncoder(ModelMixin, ConfigMixin):
    """Word-level transformer text encoder.

    Args:
        vocab: token strings; index 0 must be ``[pad]``, and ``[unk]``/``[bos]`` must be present.
            ``None``: :func:`world_vocabulary`.
        max_length: sequence length ``L`` including ``[bos]``; longer prompts are truncated.
        hidden_dim: width ``D`` of the hidden states.
        num_layers, num_heads: transformer depth and heads.
        mlp_ratio: feed-forward width / ``D``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vocab: list[str] | None = None,
        max_length: int = 16,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: int = 2,
    ):
        super().__init__()
        vocab = list(vocab) if vocab is not None else world_vocabulary()
        if vocab[0] != PAD or UNK not in vocab or BOS not in vocab:
            raise ValueError(f"vocab must start with {PAD!r} and contain {UNK!r} and {BOS!r}")
        self.register_to_config(vocab=vocab)
        self.index = {word: i for i, word in enumerate(vocab)}
        self.token_embedding = nn.Embedding(len(vocab), hidden_dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_length, hidden_dim)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    hidden_dim,
                    num_heads,
                    dim_feedforward=mlp_ratio * hidden_dim,
                    dropout=0.0,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(num_layers)
            ]
        )
        self.final_norm = nn.LayerNorm(hidden_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    @property
    def vocab(self) -> list[str]:
        return list(self.config.vocab)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts → ``(input_ids [B, L] long, attention_mask [B, L] bool)`` on the model's device.

        ``input_ids[:, 0]`` is ``[bos]``; unknown words become ``[unk]``; the mask is ``True`` on
        real tokens and ``False`` on padding.
        """
        if isinstance(prompts, str):
            raise TypeError("tokenize expects a sequence of prompts, not a single string")
        length = self.config.max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        unk, bos = self.index[UNK], self.index[BOS]
        for row, prompt in enumerate(prompts):
            tokens = [bos] + [self.index.get(word, unk) for word in split_words(prompt)]
            tokens = tokens[:length]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        ids = ids.to(self.token_embedding.weight.device)
        return ids, ids != 0

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of ``prompt`` outside the vocabulary (they would be encoded as ``[unk]``)."""
        return [word for word in split_words(prompt) if word not in self.index]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids [B, L]`` (+ ``attention_mask [B, L]``, True = keep) → hidden states ``[B, L, D]``.

        Padded positions still carry (position-dependent) hidden states; consumers pass the mask on.
        """
        if attention_mask is None:
            attention_mask = input_ids != 0
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        padding = ~attention_mask.bool()
        for layer in self.layers:
            hidden = layer(hidden, src_key_padding_mask=padding)
        return self.final_norm(hidden)

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``prompts`` → ``(hidden [B, L, D], attention_mask [B, L] bool)``."""
        ids, mask = self.tokenize(prompts)
        return self(ids, mask), mask
