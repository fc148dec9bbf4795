"""The video world's backbone: the video contract's shapes, the frames-in-channels UNet call
recomputed by hand, CFG, save/load, and DGPO steps through the Lightning module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.models.factory import load_backbone as factory_load
from dgpo_lightning.rewards.base import _REGISTRY, register
from dgpo_lightning.world.video.backbone import BASE_CHECKPOINT, load_backbone, save_backbone, tiny_backbone
from dgpo_lightning.world.video.scene import FRAMES

if "test_video_brightness" not in _REGISTRY:

    @register("test_video_brightness")
    def _video_brightness(**_):
        """Mean pixel value of a video: spread even for an untrained model (tests only)."""
        return lambda videos, prompts, metadata=None: videos.mean(dim=(1, 2, 3, 4))


PROMPTS = ["a video of a red circle moving left", "a video of two squares moving up"]


@pytest.fixture(scope="module")
def tiny_video_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_video")
    save_backbone(tiny_backbone(), path)
    return path


def _velocity_frame_by_frame(model, x, t, cond):
    """The factorised model recomputed one frame at a time: UNet([frame f, mean frame] unshuffled,
    1000 t, text, class f), pixel-shuffled back (no batching over frames, no reshapes)."""
    out = torch.empty_like(x)
    mean = x.mean(dim=2)
    for b in range(x.shape[0]):
        for f in range(x.shape[2]):
            inputs = torch.cat([F.pixel_unshuffle(x[b : b + 1, :, f], 2), F.pixel_unshuffle(mean[b : b + 1], 2)], dim=1)
            v = model.denoiser(
                inputs, 1000 * t[b : b + 1], encoder_hidden_states=cond["prompt_embeds"][b : b + 1],
                encoder_attention_mask=cond["attention_mask"][b : b + 1], class_labels=torch.tensor([f]), return_dict=False,
            )[0]
            out[b, :, f] = F.pixel_shuffle(v, 2)[0]
    return out


def test_video_contract_shapes_and_encode_decode():
    model = tiny_backbone()
    assert isinstance(model, Backbone) and model.is_video and model.num_frames == FRAMES
    assert model.latent_shape() == (3, FRAMES, 32, 32)
    videos = torch.rand(2, FRAMES, 3, 32, 32)
    latents = model.encode(videos)
    assert latents.shape == (2, 3, FRAMES, 32, 32)
    torch.testing.assert_close(latents[:, :, 1], videos[:, 1] * 2 - 1)  # frame 1, channel-first
    torch.testing.assert_close(model.decode(latents), videos)
    assert model.decode(torch.full((1, 3, FRAMES, 32, 32), 3.0)).max() == 1.0


def test_velocity_is_the_unet_per_frame_with_the_mean_frame_and_cfg_mixes_two_calls():
    torch.manual_seed(1)
    model = tiny_backbone().eval()
    with torch.no_grad():  # a non-zero frame embedding, so the frame index matters
        model.denoiser.class_embedding.weight.normal_()
    x, t = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([0.3, 0.8])
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        expected = _velocity_frame_by_frame(model, x, t, cond)
        torch.testing.assert_close(model.velocity(x, t, cond), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected[:, :, 0], expected[:, :, 1], atol=1e-3)
        empty = model.encode_prompts([""] * 2)
        uncond = model.velocity(x, t, empty)
        guided = model.velocity(x, t, cond, guidance_scale=3.0)
        torch.testing.assert_close(guided, uncond + 3.0 * (expected - uncond), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 3, 2, H, W\]"):
        model.velocity(x[:, :, 0], t, cond)


def test_factory_loads_the_saved_model_frozen_with_its_options(tiny_video_path):
    loaded = factory_load("world_video", str(tiny_video_path))
    again = load_backbone(tiny_video_path, guidance_scale=2.5)
    assert type(loaded).__name__ == "VideoWorldBackbone" and loaded.num_frames == FRAMES
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert again.default_guidance_scale == 2.5 and loaded.default_guidance_scale == 1.0
    x, t = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.velocity(x, t, loaded.encode_prompts(PROMPTS)), again.velocity(x, t, again.encode_prompts(PROMPTS))
        )


def test_round_trip_keeps_every_weight(tmp_path):
    model = tiny_backbone()
    save_backbone(model, tmp_path / "m")
    back = load_backbone(tmp_path / "m")
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), name
    assert back.options() == model.options()


@pytest.mark.skipif(not (BASE_CHECKPOINT / "unet").is_dir(), reason="the shipped video base is not committed yet")
def test_shipped_base_loads_with_no_path():
    model = load_backbone()
    assert model.latent_shape() == (3, FRAMES, 32, 32)
    assert set(model.text_encoder.vocab) >= {"moving", "apart", "together", "video"}


def test_dgpo_steps_through_the_lightning_module_with_the_video_reward(tmp_path, tiny_video_path):
    from dgpo_lightning.data.datamodule import RolloutDataModule
    from dgpo_lightning.module import DGPOModule

    module = DGPOModule(backbone="world_video", model_path=str(tiny_video_path), finetune="lora", lora_rank=4, lr=1e-3)
    module.configure_model()
    before = torch.cat([p.detach().flatten().clone() for p in module.backbone.denoiser.parameters() if p.requires_grad])
    data = RolloutDataModule(
        train_prompts="world_video:train", group_size=4, prompts_per_rank=2, num_steps=3,
        rewards={"world_video_partial": 1.0, "test_video_brightness": 1.0}, eval_prompts=None, progress=False,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, max_epochs=1, reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    after = torch.cat([p.detach().flatten() for p in module.backbone.denoiser.parameters() if p.requires_grad])
    assert trainer.global_step >= 1 and not torch.equal(before, after)
    rollout = data.last_rollout
    assert set(rollout.reward_components) == {"world_video_partial", "test_video_brightness"}
    partial = rollout.reward_components["world_video_partial"]
    assert partial.shape == (8,) and ((partial >= 0) & (partial <= 1)).all()


def test_init_from_the_image_model_gives_the_image_models_velocity_on_every_frame():
    from dgpo_lightning.world.backbone import tiny_backbone as tiny_image_backbone
    from dgpo_lightning.world.video.pretrain import init_from_image_model

    torch.manual_seed(2)
    image, video = tiny_image_backbone().eval(), tiny_backbone().eval()
    counts = init_from_image_model(video, image)
    assert counts["zeroed"] == 2 and counts["words"] == len(image.text_encoder.vocab)
    x, t = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([0.4, 0.9])
    prompts = ["a photo of a red circle", "a photo of two squares"]  # words both vocabularies share
    with torch.no_grad():
        got = video.velocity(x, t, video.encode_prompts(prompts))
        for frame in range(FRAMES):
            expected = image.velocity(x[:, :, frame].contiguous(), t, image.encode_prompts(prompts))
            torch.testing.assert_close(got[:, :, frame], expected, atol=1e-5, rtol=1e-5)


def test_canvas_layout_is_one_unet_call_on_the_frames_side_by_side_with_a_position_channel(tmp_path):
    torch.manual_seed(3)
    model = tiny_backbone(layout="canvas").eval()
    assert model.denoiser.config.in_channels == 3 * 4 + 1 and model.denoiser.config.num_class_embeds is None
    x, t = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([0.2, 0.7])
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        # independent recomputation: frames concatenated along the width, position -1 on the first
        # frame's columns and +1 on the second's, the UNet's output cut back into frames
        canvas = torch.cat([x[:, :, f] for f in range(FRAMES)], dim=-1)
        position = torch.cat([torch.full((2, 1, 16, 16), -1.0), torch.full((2, 1, 16, 16), 1.0)], dim=-1)
        out = model.denoiser(
            torch.cat([F.pixel_unshuffle(canvas, 2), position], 1), 1000 * t, encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["attention_mask"], return_dict=False,
        )[0]
        out = F.pixel_shuffle(out, 2)
        expected = torch.stack([out[..., :32], out[..., 32:]], dim=2)
        torch.testing.assert_close(model.velocity(x, t, cond), expected, atol=1e-5, rtol=1e-5)
        # one frame's velocity depends on the other frame (the canvas couples them)
        moved = x.clone()
        moved[:, :, 1] += 1.0
        assert not torch.allclose(model.velocity(moved, t, cond)[:, :, 0], expected[:, :, 0], atol=1e-4)
    save_backbone(model, tmp_path / "canvas")
    back = load_backbone(tmp_path / "canvas")
    assert back.layout == "canvas" and back.options() == model.options()


def test_canvas_init_from_the_image_model_is_the_image_model_on_the_canvas():
    from dgpo_lightning.world.backbone import tiny_backbone as tiny_image_backbone
    from dgpo_lightning.world.video.pretrain import init_from_image_model

    torch.manual_seed(4)
    image, video = tiny_image_backbone().eval(), tiny_backbone(layout="canvas").eval()
    assert init_from_image_model(video, image)["zeroed"] == 1  # only the position channel's input weights
    x, t = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([0.4, 0.9])
    prompts = ["a photo of a red circle", "a photo of two squares"]
    with torch.no_grad():
        got = video.velocity(x, t, video.encode_prompts(prompts))
        wide = image.velocity(torch.cat([x[:, :, 0], x[:, :, 1]], dim=-1), t, image.encode_prompts(prompts))
        torch.testing.assert_close(got, torch.stack([wide[..., :32], wide[..., 32:]], dim=2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        tiny_backbone(layout="stacked")


def test_frame_levels_canvas_feeds_each_frames_own_level_and_the_highest_to_the_timestep(tmp_path):
    torch.manual_seed(5)
    model = tiny_backbone(layout="canvas", frame_levels=True).eval()
    assert model.denoiser.config.in_channels == 3 * 4 + 2
    x, levels = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([[0.1, 0.8], [0.6, 0.3]])
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        canvas = torch.cat([x[:, :, 0], x[:, :, 1]], dim=-1)
        position = torch.cat([torch.full((2, 1, 16, 16), -1.0), torch.full((2, 1, 16, 16), 1.0)], dim=-1)
        level_map = torch.cat([levels[:, 0].view(2, 1, 1, 1).expand(2, 1, 16, 16), levels[:, 1].view(2, 1, 1, 1).expand(2, 1, 16, 16)], dim=-1)
        out = model.denoiser(
            torch.cat([F.pixel_unshuffle(canvas, 2), position, level_map], 1), 1000 * torch.tensor([0.8, 0.6]),
            encoder_hidden_states=cond["prompt_embeds"], encoder_attention_mask=cond["attention_mask"], return_dict=False,
        )[0]
        out = F.pixel_shuffle(out, 2)
        torch.testing.assert_close(model.frame_velocity(x, levels, cond), torch.stack([out[..., :32], out[..., 32:]], dim=2), atol=1e-5, rtol=1e-5)
        t = torch.tensor([0.25, 0.9])  # equal levels are the ordinary velocity
        torch.testing.assert_close(model.frame_velocity(x, t[:, None].expand(2, FRAMES), cond), model.velocity(x, t, cond))
    save_backbone(model, tmp_path / "levels")
    back = load_backbone(tmp_path / "levels")
    assert back.frame_levels and back.options()["frame_levels"] is True
    with pytest.raises(ValueError, match="frame_levels=True"):
        tiny_backbone(layout="canvas").frame_velocity(x, levels, cond)
    with pytest.raises(ValueError, match="levels must be"):
        model.frame_velocity(x, levels[:, :1], cond)


def test_frame_levels_factorised_gives_each_frames_call_its_own_level_and_the_clips_mean_level():
    torch.manual_seed(8)
    model = tiny_backbone(frame_levels=True).eval()
    assert model.denoiser.config.in_channels == 2 * 3 * 4 + 1
    x, levels = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([[0.1, 0.8], [0.6, 0.3]])
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        expected = torch.empty_like(x)
        mean = x.mean(dim=2)
        for b in range(2):
            for f in range(FRAMES):
                inputs = torch.cat([
                    F.pixel_unshuffle(x[b : b + 1, :, f], 2), F.pixel_unshuffle(mean[b : b + 1], 2),
                    torch.full((1, 1, 16, 16), float(levels[b].mean())),
                ], dim=1)
                v = model.denoiser(
                    inputs, 1000 * levels[b, f : f + 1], encoder_hidden_states=cond["prompt_embeds"][b : b + 1],
                    encoder_attention_mask=cond["attention_mask"][b : b + 1], class_labels=torch.tensor([f]), return_dict=False,
                )[0]
                expected[b, :, f] = F.pixel_shuffle(v, 2)[0]
        torch.testing.assert_close(model.frame_velocity(x, levels, cond), expected, atol=1e-5, rtol=1e-5)
        t = torch.tensor([0.25, 0.9])
        torch.testing.assert_close(model.frame_velocity(x, t[:, None].expand(2, FRAMES), cond), model.velocity(x, t, cond))


def test_coordinate_channels_give_each_pixel_its_row_and_column_within_its_frame(tmp_path):
    from dgpo_lightning.world.video.pretrain import init_from_video_model

    torch.manual_seed(9)
    rows = torch.linspace(-1, 1, 16).view(16, 1).expand(16, 16)
    cols = torch.linspace(-1, 1, 16).view(1, 16).expand(16, 16)
    x, t = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([0.2, 0.7])
    canvas_model = tiny_backbone(layout="canvas", coordinates=True).eval()
    assert canvas_model.denoiser.config.in_channels == 3 * 4 + 1 + 2
    cond = canvas_model.encode_prompts(PROMPTS)
    with torch.no_grad():
        canvas = torch.cat([x[:, :, 0], x[:, :, 1]], dim=-1)
        position = torch.cat([torch.full((2, 1, 16, 16), -1.0), torch.full((2, 1, 16, 16), 1.0)], dim=-1)
        coords = torch.stack([torch.cat([rows, rows], -1), torch.cat([cols, cols], -1)]).expand(2, 2, 16, 32)
        out = canvas_model.denoiser(
            torch.cat([F.pixel_unshuffle(canvas, 2), position, coords], 1), 1000 * t, encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["attention_mask"], return_dict=False,
        )[0]
        out = F.pixel_shuffle(out, 2)
        torch.testing.assert_close(canvas_model.velocity(x, t, cond), torch.stack([out[..., :32], out[..., 32:]], dim=2), atol=1e-5, rtol=1e-5)

        factorised = tiny_backbone(coordinates=True).eval()
        mean = x.mean(dim=2)
        for f in range(FRAMES):
            inputs = torch.cat([F.pixel_unshuffle(x[:, :, f], 2), F.pixel_unshuffle(mean, 2), torch.stack([rows, cols]).expand(2, 2, 16, 16)], 1)
            v = factorised.denoiser(
                inputs, 1000 * t, encoder_hidden_states=cond["prompt_embeds"], encoder_attention_mask=cond["attention_mask"],
                class_labels=torch.tensor([f, f]), return_dict=False,
            )[0]
            torch.testing.assert_close(factorised.velocity(x, t, cond)[:, :, f], F.pixel_shuffle(v, 2), atol=1e-5, rtol=1e-5)

        plain = tiny_backbone(layout="canvas").eval()
        init_from_video_model(canvas_model, plain)  # zero weights on the coordinates: the plain model
        torch.testing.assert_close(canvas_model.velocity(x, t, cond), plain.velocity(x, t, cond))
    save_backbone(canvas_model, tmp_path / "coords")
    assert load_backbone(tmp_path / "coords").coordinates
    with pytest.raises(ValueError, match="prefix"):
        init_from_video_model(tiny_backbone(layout="canvas", frame_levels=True, coordinates=True), canvas_model)


def test_a_frame_levels_model_initialised_from_a_canvas_model_starts_as_it():
    from dgpo_lightning.world.video.pretrain import init_from_video_model

    torch.manual_seed(6)
    source, widened = tiny_backbone(layout="canvas").eval(), tiny_backbone(layout="canvas", frame_levels=True).eval()
    assert init_from_video_model(widened, source) == {"copied": len(source.denoiser.state_dict()) - 1, "zeroed": 1}
    x, t = torch.randn(2, 3, FRAMES, 32, 32), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(widened.velocity(x, t, widened.encode_prompts(PROMPTS)), source.velocity(x, t, source.encode_prompts(PROMPTS)))
    with pytest.raises(ValueError, match="layouts differ"):
        init_from_video_model(widened, tiny_backbone(layout="factorised"))


def test_frame_levels_draws_lower_one_frame_of_the_chosen_clips_and_the_loss_matches_a_recomputation():
    from dgpo_lightning.world.video.pretrain import draw_frame_levels, frame_levels_loss

    levels = draw_frame_levels(4000, 2, 0.5, torch.Generator().manual_seed(0))
    uneven = levels[:, 0] != levels[:, 1]
    assert abs(uneven.float().mean().item() - 0.5) < 0.03
    low, high = levels.min(dim=1).values, levels.max(dim=1).values
    assert (low[uneven] < high[uneven]).all() and abs((low[uneven] / high[uneven]).mean().item() - 0.5) < 0.03  # u ~ U[0, 1]
    assert abs((levels[uneven, 0] < levels[uneven, 1]).float().mean().item() - 0.5) < 0.05  # either frame
    assert torch.equal(draw_frame_levels(50, 2, 0.0, torch.Generator().manual_seed(1)).diff(dim=1), torch.zeros(50, 1))

    torch.manual_seed(7)
    model = tiny_backbone(layout="canvas", frame_levels=True)
    videos = torch.rand(3, FRAMES, 3, 32, 32)
    got = frame_levels_loss(model, videos, PROMPTS[:1] * 3, torch.Generator().manual_seed(2), 0.5)
    generator = torch.Generator().manual_seed(2)  # the same draws: noise, then the levels
    x0 = videos.permute(0, 2, 1, 3, 4) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    drawn = draw_frame_levels(3, FRAMES, 0.5, generator)
    x_t = torch.stack([(1 - drawn[:, f, None, None, None]) * x0[:, :, f] + drawn[:, f, None, None, None] * noise[:, :, f] for f in range(FRAMES)], 2)
    v = model.frame_velocity(x_t, drawn, model.encode_prompts(PROMPTS[:1] * 3))
    torch.testing.assert_close(got, ((v - (noise - x0)) ** 2).mean())


def test_video_pretraining_with_frame_levels_trains_and_saves_a_frame_levels_model(tmp_path):
    from dgpo_lightning.world.video.pretrain import main

    args = ["--batch-size", "2", "--channels", "32,32,32", "--eval-samples", "1", "--final-samples", "1", "--steps", "2", "--layout", "canvas"]
    main(["--out", str(tmp_path / "a"), *args, "--frame-levels", "0.5"])
    assert load_backbone(tmp_path / "a").frame_levels
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "b"), "--frame-levels", "1.5"])  # a probability


def test_video_pretraining_writes_a_loadable_ema_checkpoint_and_resumes_its_step_count(tmp_path):
    import json

    from dgpo_lightning.world.video.pretrain import main

    out = tmp_path / "run"
    args = ["--out", str(out), "--batch-size", "2", "--channels", "32,32,32", "--eval-samples", "1", "--final-samples", "1", "--steps"]
    main([*args, "2"])
    main([*args, "3", "--resume"])
    info = json.loads((out / "pretrain.json").read_text())
    assert info["steps"] == 3 and [entry["step"] for entry in info["history"]] == [2, 3]
    assert {"overall", "partial"} <= set(info["history"][-1]["heldout"])
    assert load_backbone(out).latent_shape() == (3, FRAMES, 32, 32)
