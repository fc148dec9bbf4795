"""The embedded world's flow model: tokenizer, backbone protocol, CFG, save/load, LoRA, shipped checkpoint."""

import json

import pytest
import torch

from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.world.backbone import BASE_CHECKPOINT, load_backbone, save_backbone, tiny_backbone
from dgpo_lightning.world.model import BOS, UNK, WorldTextEncoder, world_vocabulary
from dgpo_lightning.data.prompts import load_prompt_records

ALL_PROMPTS = [r["prompt"] for split in ("train", "validation", "test") for r in load_prompt_records(f"world:{split}")]


def _inputs(backbone, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *backbone.latent_shape()), generator=g)
    t = torch.rand(batch, generator=g)
    return x, t


# ----------------------------------------------------------------------------- text encoder


def test_vocabulary_covers_every_shipped_prompt_and_marks_unknown_words():
    encoder = WorldTextEncoder(hidden_dim=16, num_layers=1, num_heads=2)
    assert all(encoder.unknown_words(p) == [] for p in ALL_PROMPTS)
    longest = max(len(p.split()) for p in ALL_PROMPTS)
    assert longest + 1 <= encoder.config.max_length  # [bos] + words fit without truncation
    ids, mask = encoder.tokenize(["a photo of a red circle", "a photo of a hexagon", ""])
    vocab = world_vocabulary()
    assert ids[:, 0].tolist() == [vocab.index(BOS)] * 3
    assert [vocab[i] for i in ids[0, 1:6]] == ["a", "photo", "of", "a", "red"]
    assert vocab[ids[1, 5]] == UNK
    assert mask.sum(1).tolist() == [7, 6, 1]  # the empty prompt keeps its [bos]
    assert encoder.unknown_words("a photo of a hexagon") == ["hexagon"]


def test_text_encoder_distinguishes_word_order_and_ignores_padding_content():
    torch.manual_seed(0)
    encoder = WorldTextEncoder(hidden_dim=16, num_layers=1, num_heads=2).eval()
    with torch.no_grad():
        hidden, mask = encoder.encode(["a photo of a red circle and a blue square", "a photo of a blue circle and a red square"])
    assert hidden.shape == (2, encoder.config.max_length, 16)
    assert not torch.allclose(hidden[0], hidden[1], atol=1e-4)
    # Real tokens do not attend to padding: the same prompt gives the same states whatever the length.
    short = WorldTextEncoder(hidden_dim=16, num_layers=1, num_heads=2, max_length=12)
    short.load_state_dict({k: (v[:12] if k == "position_embedding.weight" else v) for k, v in encoder.state_dict().items()})
    with torch.no_grad():
        hidden_short, _ = short.eval().encode(["a photo of a red circle and a blue square"])
    n = int(mask[0].sum())
    torch.testing.assert_close(hidden_short[0, :n], hidden[0, :n], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- backbone


def test_backbone_implements_the_protocol_and_the_latent_convention():
    backbone = tiny_backbone().eval()
    assert isinstance(backbone, Backbone)
    assert backbone.latent_shape() == (3, 32, 32)
    images = torch.rand(2, 3, 32, 32)
    latents = backbone.encode(images)
    torch.testing.assert_close(latents, images * 2 - 1)
    torch.testing.assert_close(backbone.decode(latents), images)
    assert backbone.decode(torch.full((1, 3, 32, 32), 3.0)).max() == 1.0  # clamped
    x, t = _inputs(backbone)
    cond = backbone.encode_prompts(["a photo of a circle", "a photo of two squares", ""])
    v = backbone.velocity(x, t, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_cfg_is_the_guided_combination_against_the_empty_prompt():
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    x, t = _inputs(backbone)
    with torch.no_grad():
        cond = backbone.encode_prompts(["a photo of a circle", "a photo of a red square", "a photo of three triangles"])
        empty = backbone.encode_prompts([""] * 3)
        v_cond = backbone.velocity(x, t, cond)
        v_uncond = backbone.velocity(x, t, empty)
        guided = backbone.velocity(x, t, cond, guidance_scale=3.5)
    assert not torch.allclose(v_cond, v_uncond, atol=1e-5)  # the text matters
    torch.testing.assert_close(guided, v_uncond + 3.5 * (v_cond - v_uncond), atol=1e-5, rtol=1e-4)


def test_timestep_reaches_the_unet_as_1000_t():
    backbone = tiny_backbone().eval()
    seen = []
    backbone.denoiser.time_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    x, _ = _inputs(backbone, batch=2)
    with torch.no_grad():
        backbone.velocity(x, torch.tensor([0.25, 1.0]), backbone.encode_prompts(["a photo of a circle"] * 2))
    torch.testing.assert_close(seen[0], torch.tensor([250.0, 1000.0]))


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    backbone = tiny_backbone(guidance_scale=2.5, shift=2.0).eval()
    save_backbone(backbone, tmp_path / "model")
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "model" / "text_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "model" / "backbone.json").read_text())["guidance_scale"] == 2.5
    loaded = load_backbone(tmp_path / "model")
    assert loaded.default_guidance_scale == 2.5 and loaded.shift == 2.0 and loaded.patch_size == backbone.patch_size
    assert not any(p.requires_grad for p in loaded.parameters())
    x, t = _inputs(backbone)
    prompts = ["a photo of a green triangle", "a photo of a circle below a square", ""]
    with torch.no_grad():
        expected = backbone.velocity(x, t, backbone.encode_prompts(prompts), guidance_scale=2.0)
        actual = loaded.velocity(x, t, loaded.encode_prompts(prompts), guidance_scale=2.0)
    assert torch.equal(actual, expected)
    assert load_backbone(tmp_path / "model", guidance_scale=1.0).default_guidance_scale == 1.0


def test_fp16_save_halves_the_files_and_loads_back_to_fp32(tmp_path):
    backbone = tiny_backbone()
    save_backbone(backbone, tmp_path / "fp32")
    save_backbone(backbone, tmp_path / "fp16", dtype=torch.float16)
    size = lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "fp16") < 0.6 * size(tmp_path / "fp32")
    loaded = load_backbone(tmp_path / "fp16")
    assert next(loaded.denoiser.parameters()).dtype == torch.float32
    assert next(backbone.denoiser.parameters()).dtype == torch.float32  # the original is untouched


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet/ and text_encoder/"):
        load_backbone(tmp_path)


def test_lora_adapter_changes_outputs_and_disabling_restores_the_base():
    from peft import LoraConfig

    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    x, t = _inputs(backbone)
    cond = backbone.encode_prompts(["a photo of a red circle", "a photo of two squares", "a photo of a triangle"])
    with torch.no_grad():
        base = backbone.velocity(x, t, cond)
    unet = backbone.denoiser
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_b = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert lora_b, "no LoRA layers were injected into the attention projections"
    with torch.no_grad():
        torch.testing.assert_close(backbone.velocity(x, t, cond), base)  # B = 0 at init
        for p in lora_b:
            p.normal_(std=0.5)
        adapted = backbone.velocity(x, t, cond)
        unet.disable_adapters()
        disabled = backbone.velocity(x, t, cond)
        unet.enable_adapters()
        reenabled = backbone.velocity(x, t, cond)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(disabled, base)
    torch.testing.assert_close(reenabled, adapted)


def test_pretraining_loss_trains_unet_and_text_encoder_jointly():
    from dgpo_lightning.world.pretrain import flow_matching_loss, render_batch

    torch.manual_seed(0)
    backbone = tiny_backbone().train()
    records = load_prompt_records("world:train")[:4]
    g = torch.Generator().manual_seed(0)
    loss = flow_matching_loss(backbone, render_batch(records, g), [r["prompt"] for r in records], g)
    loss.backward()
    assert loss.item() > 0
    for name, module in (("unet", backbone.denoiser), ("text encoder", backbone.text_encoder)):
        assert sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None) > 0, name


def test_pretrain_cli_writes_a_loadable_ema_checkpoint(tmp_path, capsys):
    from dgpo_lightning.world.pretrain import main

    out = tmp_path / "run"
    main(["--out", str(out), "--steps", "2", "--batch-size", "4", "--channels", "8,16,16", "--text-dim", "16",
          "--text-layers", "1", "--guidance-scale", "2.0", "--no-progress"])
    info = json.loads((out / "pretrain.json").read_text())
    assert info["steps"] == 2
    assert set(info["history"][-1]["heldout"]["cfg2"]) >= {"overall", "single_object", "color_attr"}
    loaded = load_backbone(out)
    assert loaded.default_guidance_scale == 2.0
    assert "held-out" in capsys.readouterr().out


def test_pretraining_stopped_and_resumed_equals_one_uninterrupted_run_bit_for_bit(tmp_path):
    from dgpo_lightning.world.pretrain import TRAIN_STATE, main

    tiny = ["--batch-size", "4", "--channels", "8,16,16", "--text-dim", "16", "--text-layers", "1", "--no-progress",
            "--warmup", "3", "--steps"]
    main(["--out", str(tmp_path / "whole"), *tiny, "4"])
    main(["--out", str(tmp_path / "split"), *tiny, "2"])
    main(["--out", str(tmp_path / "split"), *tiny, "4", "--resume"])
    whole, split = (torch.load(tmp_path / name / TRAIN_STATE, weights_only=False) for name in ("whole", "split"))
    assert whole["step"] == split["step"] == 4 and whole["loss"] == split["loss"]
    for key in ("model", "ema"):
        for name, value in whole[key].items():
            torch.testing.assert_close(split[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    assert split["optimizer"]["param_groups"][0]["lr"] == whole["optimizer"]["param_groups"][0]["lr"]
    assert torch.equal(split["generator"], whole["generator"])
    assert [entry["step"] for entry in split["history"]] == [2, 4]


def test_pretraining_state_warms_up_the_lr_and_the_ema_decay_then_decays_the_lr():
    from dgpo_lightning.world.training import PretrainingState

    model = torch.nn.Linear(2, 1, bias=False)
    state = PretrainingState(model, lr=1.0, warmup=4, ema_decay=0.5, seed=0, max_steps=10, decay_steps=5)
    lrs, emas = [], []
    for _ in range(10):
        lrs.append(state.optimizer.param_groups[0]["lr"])
        before = state.ema.weight.detach().clone()
        state.update(model(torch.ones(1, 2)).sum())
        decay = min(0.5, (1 + state.step) / (10 + state.step))
        emas.append(torch.allclose(state.ema.weight, decay * before + (1 - decay) * model.weight.detach()))
    # warm-up (step + 1) / 4, then 1, then the last 5 steps decay linearly to 10%: (10 - step) / 5
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    assert lrs == pytest.approx(expected)
    assert all(emas)


# ----------------------------------------------------------------------------- shipped checkpoint


def test_shipped_checkpoint_is_small_safetensors_and_loads():
    files = [p for p in BASE_CHECKPOINT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert (BASE_CHECKPOINT / "MODEL_CARD.md").is_file()
    backbone = load_backbone()
    assert backbone.latent_shape() == (3, 32, 32)
    assert backbone.default_guidance_scale >= 1.0


def test_shipped_checkpoint_samples_deterministically_for_a_seed():
    from dgpo_lightning.evaluate import generate_images

    backbone = load_backbone()
    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of a red circle"]
    first = generate_images(backbone, prompts, [7, 8, 9])
    again = generate_images(backbone, prompts, [7, 8, 9], batch_size=1)
    other = generate_images(backbone, prompts, [10, 11, 12])
    torch.testing.assert_close(first, again, atol=1e-5, rtol=0)
    assert first.shape == (3, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert (first - other).abs().mean() > 0.01  # a different seed is a different image
    assert (first[0] - first[2]).abs().mean() > 0.01  # same prompt, different seed
