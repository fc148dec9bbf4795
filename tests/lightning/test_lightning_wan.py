"""The Wan 2.1 text-to-video path through the Lightning system and the evaluation CLI: a tiny random
WanPipeline saved to disk, loaded by name like a real ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` directory,
LoRA-trained by DGPO for two optimizer steps on 5-D video latents with a video reward (rollouts with
true CFG against the negative prompt), exported, and scored by ``python -m dgpo_lightning.evaluate``
with and without the adapter (each example saved as an animated GIF); and the experiment config
parses with the values it claims."""

import json
from pathlib import Path

import pytest
import torch

from backbone_checks import check_trained_lora
from dgpo_lightning.models.testing.wan import TINY_WAN, build_tiny_wan

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "base" / "wan_pickscore.yaml"
OPTIONS = {"resolution": TINY_WAN["resolution"], "num_frames": TINY_WAN["num_frames"], "max_sequence_length": 32}
REWARD = {"frame_mean": 1.0}
REWARD_OPTIONS = {"frame_mean": {"reward": "jpeg_incompressibility", "frames": 3}}
PROMPTS = ["a red cube", "a blue sphere on a green table"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two DGPO steps on the tiny Wan pipeline; the weights before and after; the exported adapter."""
    import lightning as L

    from dgpo_lightning.callbacks.export import export_model
    from dgpo_lightning.data.datamodule import RolloutDataModule
    from dgpo_lightning.module import DGPOModule

    root = tmp_path_factory.mktemp("wan")
    model = root / "wan"
    build_tiny_wan(seed=0).save_pretrained(model)
    prompts = root / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    torch.manual_seed(0)
    module = DGPOModule(backbone="wan", model_path=str(model), backbone_options=dict(OPTIONS), finetune="lora",
                        lora_rank=4, lr=3e-2, t_min=0.5, timesteps_per_sample=2)
    module.configure_model()
    data = RolloutDataModule(train_prompts=str(prompts), group_size=2, prompts_per_rank=2, num_steps=2,
                             rewards=REWARD, reward_options={**REWARD_OPTIONS, "temporal_consistency": {}},
                             eval_prompts=str(prompts), eval_images_per_prompt=1, eval_num_steps=2,
                             eval_rewards=["frame_mean", "temporal_consistency"], progress=False, guidance_scale=5.0)
    denoiser = module.backbone.denoiser
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    trainable = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    from dgpo_lightning.callbacks import SampleGrid

    trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=2, reload_dataloaders_every_n_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=1,
                        default_root_dir=str(root / "run"), callbacks=[SampleGrid(per_task=2)])
    with pytest.warns(UserWarning, match="MP4 skipped"):  # no PyAV / imageio-ffmpeg in the test env
        trainer.fit(module, data)
    export_model(module, root / "final")
    return {"root": root, "model": model, "prompts": prompts, "module": module, "trainer": trainer,
            "before": before, "trainable": trainable, "adapter": root / "final" / "adapter", "data": data}


def test_two_dgpo_steps_on_tiny_wan_video_latents_with_lora(trained):
    lora = check_trained_lora(trained)
    backbone = trained["module"].backbone
    assert backbone.is_video and backbone.cfg_mode == "true" and backbone.negative_prompt == ""
    layers = {n.split(".lora_")[0].split(".", 2)[-1] for n in lora}
    assert layers == {f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
    # The validation loop scored videos and the SampleGrid drew strips and wrote a GIF per example.
    metrics = trained["trainer"].callback_metrics
    assert {"eval/frame_mean", "eval/temporal_consistency"} <= set(metrics)
    assert 0 < float(metrics["eval/temporal_consistency"]) <= 1
    examples = trained["module"].last_eval_examples
    assert examples["images"].shape == (2, TINY_WAN["num_frames"], 3, TINY_WAN["resolution"], TINY_WAN["resolution"])
    samples = trained["root"] / "run" / "samples"
    assert (samples / "step_000002.png").is_file()
    assert len(list((samples / "step_000002_videos").glob("*.gif"))) == 2


def test_evaluate_cli_on_tiny_wan_writes_videos(trained, tmp_path, capsys):
    from dgpo_lightning.data.rollout import sample_latents
    from dgpo_lightning.evaluate import main
    from dgpo_lightning.models.lora import load_adapter
    from dgpo_lightning.models.wan import WanBackbone
    from dgpo_lightning.rewards.base import build
    from dgpo_lightning.sampling.seeds import member_seeds
    from dgpo_lightning.sampling.settings import SamplerSettings

    argv = ["--backbone", "wan", "--model", str(trained["model"]), "--backbone-options", json.dumps(OPTIONS),
            "--prompts", str(trained["prompts"]), "--reward", "frame_mean",
            "--reward-options", json.dumps(REWARD_OPTIONS), "--num-steps", "2", "--images-per-prompt", "2",
            "--seed", "7", "--batch-size", "4", "--no-progress"]
    main([*argv, "--out", str(tmp_path / "base.json")])
    main([*argv, "--out", str(tmp_path / "tuned.json"), "--adapter", str(trained["adapter"])])
    assert "+ adapter" in capsys.readouterr().out
    # The grid (a frame strip per sample) and each example video as an animated GIF.
    from PIL import Image

    assert (tmp_path / "base.png").is_file()
    index = json.loads((tmp_path / "base_videos" / "index.json").read_text())
    assert len(index["videos"]) == 4 and index["frames"] == TINY_WAN["num_frames"]
    with Image.open(tmp_path / "base_videos" / index["videos"][0]["gif"]) as gif:
        assert gif.n_frames == TINY_WAN["num_frames"] and gif.size == (TINY_WAN["resolution"],) * 2
    base, tuned = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("base", "tuned"))
    scores = {name: [row["frame_mean"] for row in r["per_image"]] for name, r in (("base", base), ("tuned", tuned))}
    assert len(scores["base"]) == 4 and len(set(scores["base"])) == 4
    assert scores["base"] != scores["tuned"]
    assert base["run"]["guidance_scale"] == 5.0 and base["run"]["shift"] == 3.0  # Wan's defaults
    # Every score is the reward of videos sampled independently from the planned seeds.
    for name, adapter in (("base", None), ("tuned", trained["adapter"])):
        backbone = WanBackbone.from_pretrained(trained["model"], **OPTIONS)
        if adapter is not None:
            load_adapter(backbone, adapter)
        prompts = [p for p in PROMPTS for _ in range(2)]
        seeds = member_seeds(7, range(2), 2)
        with torch.no_grad():
            videos = backbone.decode(sample_latents(backbone, prompts, seeds, SamplerSettings(num_steps=2)).sample)
        assert videos.shape == (4, TINY_WAN["num_frames"], 3, TINY_WAN["resolution"], TINY_WAN["resolution"])
        expected = build("frame_mean", **REWARD_OPTIONS["frame_mean"])(videos, prompts)
        assert scores[name] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)


def test_wan_pickscore_config_parses(tmp_path):
    from dgpo_lightning.cli import DGPOCLI

    cli = DGPOCLI(args=["--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
                        "--trainer.precision=32-true", "--trainer.logger=false"], run=False)
    hp, data = cli.model.hparams, cli.datamodule.hparams
    assert hp.backbone == "wan"
    options = hp.backbone_options
    assert (options["resolution"], options["width"], options["num_frames"]) == (240, 416, 33)  # Flow-GRPO
    assert options["max_sequence_length"] == 512 and options["negative_prompt"] == ""
    assert (hp.lora_rank, hp.lora_alpha) == (32, 64)  # Flow-GRPO's Wan LoRA
    assert (hp.beta, hp.kl_beta, hp.clip_range, hp.t_min) == (10.0, 0.001, 0.05, 0.666)  # DGPO's PickScore preset
    assert data.num_steps == 10 and data.eval_num_steps == 50 and data.guidance_scale == 4.5
    assert data.shift is None  # the backbone's flow_shift 3 applies
    assert data.rewards == {"frame_mean": 1.0} and data.reward_options["frame_mean"]["reward"] == "pickscore"
    assert data.reward_options["frame_mean"]["stride"] == 4
    assert list(data.eval_rewards) == ["frame_mean", "temporal_consistency"]
    # The reward options build the video rewards they name (the scorers load lazily: nothing is read here).
    from dgpo_lightning.rewards import build

    assert build("temporal_consistency", **data.reward_options["temporal_consistency"]) is not None
    # The backbone options fit the Wan VAE factors (8 spatial x patch 2, 4 temporal).
    assert options["resolution"] % 16 == options["width"] % 16 == (options["num_frames"] - 1) % 4 == 0
