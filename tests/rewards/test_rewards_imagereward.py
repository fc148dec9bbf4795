"""ImageReward on a tiny random BLIP saved in the original checkpoint's naming (``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``), checked against a plain-torch recomputation from those
original-named tensors: ViT (patch conv, pre-norm blocks with fused qkv, final norm), BERT with
self-attention, cross-attention and FFN (post-norm), the MLP head and the normalisation."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dgpo_lightning.rewards import available, build
from dgpo_lightning.rewards.imagereward import (
    SCORE_MEAN,
    SCORE_STD,
    VIT_LARGE,
    ImageRewardModel,
    ImageRewardScorer,
    convert_checkpoint,
    map_checkpoint_key,
)

SIZE, PATCH = 32, 8  # tiny ViT input and patch size: 16 patches + [CLS]
DV, DV_FFN, DV_HEADS, DV_LAYERS = 48, 96, 4, 2
DT, DT_FFN, DT_HEADS, DT_LAYERS, MAX_POS = 32, 64, 4, 2, 40
HEAD = (1024, 128, 64, 16, 1)
WORDS = "a photo of cat dog red blue apple two cars on the table under sky green ##s".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
V = len(VOCAB) + 2  # + [DEC], [ENC]
PROMPTS = ["a photo of a cat", "two blue cars on the table", " ".join(["red apple"] * 20)]  # the last is truncated


def _random_checkpoint(seed=0):
    """A state dict in ImageReward.pt's naming, with BLIP's unused projections and position ids."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, dim):
        return {prefix + ".weight": 1 + w(dim, scale=0.1), prefix + ".bias": w(dim, scale=0.1)}

    def linear(prefix, out, inp, scale=None):
        return {prefix + ".weight": w(out, inp, scale=scale or 1 / math.sqrt(inp)), prefix + ".bias": w(out, scale=0.1)}

    sd = {}
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = w(1, 1, DV, scale=0.5)
    sd[v + "pos_embed"] = w(1, (SIZE // PATCH) ** 2 + 1, DV, scale=0.5)
    sd.update(linear(v + "patch_embed.proj", DV, 3 * PATCH * PATCH))
    sd[v + "patch_embed.proj.weight"] = sd[v + "patch_embed.proj.weight"].view(DV, 3, PATCH, PATCH)
    for i in range(DV_LAYERS):
        b = f"{v}blocks.{i}."
        sd.update(norm(b + "norm1", DV) | norm(b + "norm2", DV))
        sd.update(linear(b + "attn.qkv", 3 * DV, DV, scale=0.5) | linear(b + "attn.proj", DV, DV))
        sd.update(linear(b + "mlp.fc1", DV_FFN, DV) | linear(b + "mlp.fc2", DV, DV_FFN))
    sd.update(norm(v + "norm", DV))
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = w(V, DT, scale=0.5)
    sd[t + "embeddings.position_embeddings.weight"] = w(MAX_POS, DT, scale=0.5)
    sd[t + "embeddings.position_ids"] = torch.arange(MAX_POS).view(1, -1)
    sd.update(norm(t + "embeddings.LayerNorm", DT))
    for i in range(DT_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for kind, kv_width in (("attention", DT), ("crossattention", DV)):
            sd.update(linear(f"{b}{kind}.self.query", DT, DT, scale=0.5))
            sd.update(linear(f"{b}{kind}.self.key", DT, kv_width, scale=0.5))
            sd.update(linear(f"{b}{kind}.self.value", DT, kv_width))
            sd.update(linear(f"{b}{kind}.output.dense", DT, DT) | norm(f"{b}{kind}.output.LayerNorm", DT))
        sd.update(linear(b + "intermediate.dense", DT_FFN, DT) | linear(b + "output.dense", DT, DT_FFN))
        sd.update(norm(b + "output.LayerNorm", DT))
    sd.update(linear("blip.vision_proj", 16, DV) | linear("blip.text_proj", 16, DT))  # unused by the score
    width = DT
    for index, out in zip((0, 2, 4, 6, 7), HEAD):
        sd.update(linear(f"mlp.layers.{index}", out, width, scale=1 / math.sqrt(width)))
        width = out
    return sd


MED_CONFIG = {  # the layout of ImageReward's med_config.json, tiny
    "architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": DT, "intermediate_size": DT_FFN,
    "layer_norm_eps": 1e-12, "max_position_embeddings": MAX_POS, "model_type": "bert",
    "num_attention_heads": DT_HEADS, "num_hidden_layers": DT_LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
    "vocab_size": V, "encoder_width": 768, "add_cross_attention": True,
}
VISION = {"hidden_size": DV, "intermediate_size": DV_FFN, "num_hidden_layers": DV_LAYERS,
          "num_attention_heads": DV_HEADS, "patch_size": PATCH}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (root / "med_config.json").write_text(json.dumps(MED_CONFIG))
    state = _random_checkpoint()
    torch.save(state, root / "ImageReward.pt")
    return {"root": root, "state": state}


def _options(files, **overrides):
    root = files["root"]
    options = {
        "checkpoint_path": str(root / "ImageReward.pt"), "med_config": str(root / "med_config.json"),
        "tokenizer_path": str(root / "tokenizer"), "vision_config": VISION, "image_size": SIZE,
    }
    return options | overrides


@pytest.fixture(scope="module")
def reward(files):
    return build("imagereward", **_options(files))


def _tokenizer(files):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)})  # transformers 5: a dict
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _images(batch=3, seed=0, size=SIZE):
    shape = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, 3, *shape, generator=torch.Generator().manual_seed(seed))


# ---- the independent recomputation, from original-named tensors ----

def _attention(q, k, v, heads, bias=None):
    b, n, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def _reference_vit(sd, pixels):
    p = "blip.visual_encoder."
    ln = lambda x, name: F.layer_norm(x, (DV,), sd[p + name + ".weight"], sd[p + name + ".bias"], 1e-6)  # noqa: E731
    lin = lambda x, name: F.linear(x, sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[p + "pos_embed"]
    for i in range(DV_LAYERS):
        b = f"blocks.{i}."
        q, k, v = lin(ln(x, b + "norm1"), b + "attn.qkv").chunk(3, dim=-1)  # qkv rows: [q; k; v]
        x = x + lin(_attention(q, k, v, DV_HEADS), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(x, "norm")


def _reference_text(sd, ids, mask, image):
    p = "blip.text_encoder."
    ln = lambda x, name: F.layer_norm(x, (DT,), sd[p + name + ".weight"], sd[p + name + ".bias"], 1e-12)  # noqa: E731
    lin = lambda x, name: F.linear(x, sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
    h = sd[p + "embeddings.word_embeddings.weight"][ids]
    h = h + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = ln(h, "embeddings.LayerNorm")
    pad_bias = (1.0 - mask[:, None, None, :].float()) * -1e9  # padding keys are not attended to
    for i in range(DT_LAYERS):
        b = f"encoder.layer.{i}."
        for kind, context, bias in (("attention", None, pad_bias), ("crossattention", image, None)):
            kv = h if context is None else context
            s = b + kind + ".self."
            a = _attention(lin(h, s + "query"), lin(kv, s + "key"), lin(kv, s + "value"), DT_HEADS, bias)
            h = ln(h + lin(a, b + kind + ".output.dense"), b + kind + ".output.LayerNorm")
        h = ln(h + lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense"), b + "output.LayerNorm")
    return h


def _reference_scores(sd, images, ids, mask):
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    pixels = (images - mean) / std
    x = _reference_text(sd, ids, mask, _reference_vit(sd, pixels))[:, 0]
    for index in (0, 2, 4, 6, 7):  # Linear layers; no activations between them
        x = F.linear(x, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return (x.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def _ids(files, prompts, first_token="cls"):
    tokens = _tokenizer(files)(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    ids = tokens["input_ids"].clone()
    if first_token == "enc":
        ids[:, 0] = V - 1
    return ids, tokens["attention_mask"]


# ---- tests ----

def test_registered():
    assert "imagereward" in available()
    assert (SCORE_MEAN, SCORE_STD) == (0.16717362830052426, 1.0333394966054072)


def test_tokenizer_gets_blip_tokens_and_pads_to_35(files, reward):
    reward(_images(1), PROMPTS[:1])  # loads
    tokenizer = reward.tokenizer
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [V - 2, V - 1]
    ids, mask = reward.tokenize(PROMPTS, torch.device("cpu"))
    assert ids.shape == mask.shape == (3, 35)
    cat = [VOCAB.index(t) for t in ("[CLS]", "a", "photo", "of", "a", "cat", "[SEP]")]
    assert ids[0, :7].tolist() == cat and ids[0, 7:].eq(0).all() and mask[0].sum() == 7
    assert mask[2].all() and ids[2, -1] == VOCAB.index("[SEP]")  # truncated to 35
    assert reward.tokenize(PROMPTS[:2], torch.device("cpu"))[0].shape == (2, 35)  # padded to 35, not to the longest


def test_scores_match_plain_torch_recomputation(files, reward):
    images = _images()
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and not scores.requires_grad
    expected = _reference_scores(files["state"], images, *_ids(files, PROMPTS))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.05  # the comparison is not between near-constants


def test_enc_first_token_safetensors_dict_config_and_vocab_file(files, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in files["state"].items()}, tmp_path / "ImageReward.safetensors")
    reward = build(
        "imagereward",
        **_options(files, checkpoint_path=str(tmp_path / "ImageReward.safetensors"), med_config=MED_CONFIG,
                   tokenizer_path=str(files["root"] / "tokenizer" / "vocab.txt"), first_token="enc"),
    )
    images = _images(seed=1)
    expected = _reference_scores(files["state"], images, *_ids(files, PROMPTS, first_token="enc"))
    torch.testing.assert_close(reward(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)
    cls = _reference_scores(files["state"], images, *_ids(files, PROMPTS))
    assert (expected - cls).abs().max() > 1e-3  # [ENC] vs [CLS] first is a different score


def test_scores_change_with_prompt_and_image(reward):
    image = _images(1, seed=2).expand(3, -1, -1, -1)
    by_prompt = reward(image, PROMPTS)
    assert (by_prompt[1:] - by_prompt[0]).abs().min() > 1e-4
    by_image = reward(_images(3, seed=3), ["a photo of a cat"] * 3)
    assert (by_image[1:] - by_image[0]).abs().min() > 1e-4


def test_resizes_shortest_side_and_centre_crops(files, reward):
    images = _images(2, seed=4, size=(48, 64))  # → 32 x 42 (long side floored), crop 32 x 32 at column 5
    resized = F.interpolate(images, size=(32, 42), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    expected = _reference_scores(files["state"], resized[..., 5:37], *_ids(files, PROMPTS[:2]))
    torch.testing.assert_close(reward(images, PROMPTS[:2]), expected, rtol=1e-5, atol=1e-5)


def test_bad_unknown_or_missing_keys_are_named(files, tmp_path):
    state = dict(files["state"])
    state["blip.visual_encoder.blocks.0.attn.bogus.weight"] = torch.zeros(1)
    state["blip.text_decoder.cls.predictions.bias"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"blip\.text_decoder\.cls\.predictions\.bias.*bogus|bogus.*text_decoder"):
        build("imagereward", **_options(files, checkpoint_path=str(tmp_path / "bad.pt")))(_images(1), ["a"])

    state = dict(files["state"])
    del state["blip.visual_encoder.blocks.1.mlp.fc2.bias"], state["mlp.layers.7.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias.*7\.weight"):
        build("imagereward", **_options(files, checkpoint_path=str(tmp_path / "missing.pt")))(_images(1), ["a"])

    state = dict(files["state"])
    state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"] = torch.zeros(DT, DT)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"crossattention\.self\.key\.weight"):
        build("imagereward", **_options(files, checkpoint_path=str(tmp_path / "shape.pt")))(_images(1), ["a"])


def test_missing_paths_name_the_option(files, tmp_path):
    cases = [
        ({"checkpoint_path": None}, ValueError, "checkpoint_path"),
        ({"checkpoint_path": str(tmp_path / "nope.pt")}, FileNotFoundError, "checkpoint_path"),
        ({"tokenizer_path": None}, ValueError, "tokenizer_path"),
        ({"tokenizer_path": str(tmp_path / "no_tokenizer")}, FileNotFoundError, "tokenizer_path"),
        ({"med_config": None}, ValueError, "med_config"),
        ({"med_config": str(tmp_path / "med.json")}, FileNotFoundError, "med_config"),
    ]
    for overrides, error, option in cases:
        with pytest.raises(error, match=option):
            build("imagereward", **_options(files, **overrides))(_images(1), ["a"])
    with pytest.raises(ValueError, match="first_token"):
        build("imagereward", **_options(files, first_token="sep"))
    with pytest.raises(ValueError, match="2 prompts"):
        build("imagereward", **_options(files))(_images(1), ["a", "b"])


def _release_keys():
    """Every key of the released ImageReward.pt's layout (ViT-L/16 at 224, BERT-base), by name."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    for i in range(24):
        keys += [f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")]
    keys = ["blip.visual_encoder." + k for k in keys]
    text = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.position_ids",
            "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(12):
        for kind in ("attention", "crossattention"):
            text += [f"encoder.layer.{i}.{kind}.{m}.{p}" for m in ("self.query", "self.key", "self.value",
                     "output.dense", "output.LayerNorm") for p in ("weight", "bias")]
        text += [f"encoder.layer.{i}.{m}.{p}" for m in ("intermediate.dense", "output.dense", "output.LayerNorm")
                 for p in ("weight", "bias")]
    keys += ["blip.text_encoder." + k for k in text]
    keys += [f"blip.{m}.{p}" for m in ("vision_proj", "text_proj") for p in ("weight", "bias")]
    return keys + [f"mlp.layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def test_key_mapping_covers_the_release_layout():
    vit = "blip.visual_encoder.blocks.3."
    assert map_checkpoint_key(vit + "attn.qkv.weight") == ("vision", "encoder.layers.3.self_attn.qkv.weight")
    assert map_checkpoint_key(vit + "attn.proj.bias") == ("vision", "encoder.layers.3.self_attn.projection.bias")
    assert map_checkpoint_key("blip.visual_encoder.norm.weight") == ("vision", "post_layernorm.weight")
    assert map_checkpoint_key("blip.vision_proj.weight") is None
    with pytest.raises(KeyError):
        map_checkpoint_key("blip.visual_encoder.blocks.0.norm3.weight")
    release = {"med_config": {**MED_CONFIG, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                              "num_hidden_layers": 12, "max_position_embeddings": 512, "vocab_size": 30524}}
    vision_config, text_config = ImageRewardScorer(**release).configs()
    assert vision_config.hidden_size == VIT_LARGE["hidden_size"] == text_config.encoder_hidden_size == 1024
    with torch.device("meta"):  # shapes only, no memory
        model = ImageRewardModel(vision_config, text_config)
    parts = convert_checkpoint(dict.fromkeys(_release_keys()))
    for part, module in (("vision", model.vision), ("text", model.text), ("head", model.head)):
        assert set(parts[part]) == set(module.state_dict()), part
