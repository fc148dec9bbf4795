"""The paper's three task configs (experiments/paper), and their CFG-free variants, start a real run.

Each config is run through the command line as a user would, with only what a CPU test must change
overridden: the tiny random SD3 saved to disk instead of SD3.5-M, tiny reward models in the same
reward slots (a tiny Mask2Former + open_clip for GenEval, a tiny CLIP for PickScore, the real
RapidOCR for OCR), small prompt files, one optimizer step, CPU and fp32. Everything else (β, KL, clip
range against the old policy, t_min, LoRA, EMA callback, advantage clip, CFG modes) is the config's.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from dgpo_lightning.cli import DGPOCLI
from dgpo_lightning.models.testing import (
    TINY_OPEN_CLIP_CONFIG,
    build_tiny_sd3,
    save_tiny_clip,
    save_tiny_mask2former,
    save_tiny_open_clip,
)

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper"
TASKS = ("geneval", "ocr", "pickscore")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    build_tiny_sd3(seed=0).save_pretrained(root / "sd3")
    labels = ("cat", "dog", "computer mouse", "tv remote")
    save_tiny_mask2former(root / "mask2former", labels=labels)
    save_tiny_open_clip(root / "vit-l-14.pt")
    save_tiny_clip(root / "pickscore")
    geneval = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"},
    ]
    (root / "geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in geneval))
    (root / "ocr.txt").write_text('a sign that says "open"\na poster with the text "hello"\n')
    (root / "pickscore.txt").write_text("a photo of a cat\na realistic photo of an astronaut riding a horse\n")
    return root


def _overrides(task, assets, run_dir):
    prompts = {"geneval": assets / "geneval.jsonl", "ocr": assets / "ocr.txt", "pickscore": assets / "pickscore.txt"}[task]
    options = {
        "geneval": {
            "geneval": {
                "detector": {
                    "kind": "mask2former",
                    "model_path": str(assets / "mask2former"),
                    "clip_backend": "open_clip",
                    "clip_path": str(assets / "vit-l-14.pt"),
                    "clip_model_config": TINY_OPEN_CLIP_CONFIG,
                }
            }
        },
        "ocr": {},
        "pickscore": {"pickscore": {"model_path": str(assets / "pickscore"), "processor_path": str(assets / "pickscore")}},
    }[task]
    return [
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.max_steps=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run_dir}",
        f"--model.model_path={assets / 'sd3'}",
        '--model.backbone_options={"resolution": 32, "torch_dtype": "float32"}',
        "--model.micro_batch_size=2", "--model.lora_rank=4",
        f"--data.train_prompts={prompts}", f"--data.eval_prompts={prompts}",
        "--data.group_size=2", "--data.prompts_per_rank=1", "--data.num_steps=2", "--data.eval_num_steps=2",
        "--data.rollout_batch_size=4", "--data.eval_images_per_prompt=1", "--data.progress=false",
        # Random tiny models often give a group equal scores (OCR reads nothing): train on it anyway.
        "--data.skip_zero_std_groups=false", "--trainer.check_val_every_n_epoch=1",
        f"--data.reward_options={json.dumps(options)}",
    ]


# Every task in the default mode; the CFG-free overlay on PickScore by default (the fastest reward) and
# on the other two in the slow suite (test_lightning_cli.py parses all six combinations).
RUNS = [
    *[pytest.param(task, False, id=f"{task}-cfg") for task in TASKS],
    pytest.param("pickscore", True, id="pickscore-cfg_free"),
    *[pytest.param(task, True, id=f"{task}-cfg_free", marks=pytest.mark.slow) for task in ("geneval", "ocr")],
]


@pytest.mark.parametrize(("task", "cfg_free"), RUNS)
def test_paper_config_starts_a_run_on_the_tiny_sd3(task, cfg_free, assets, tmp_path):
    config = PAPER / f"sd35m_{task}.yaml"
    recipe = yaml.safe_load(config.read_text())
    configs = ["--config", str(config)] + (["--config", str(PAPER / "cfg_free.yaml")] if cfg_free else [])
    cli = DGPOCLI(args=["fit", *configs, *_overrides(task, assets, tmp_path / "run")])

    assert cli.trainer.global_step == 1
    hp, data = cli.model.hparams, cli.datamodule.hparams
    # The recipe's values reached the objects that run (not only the YAML).
    assert hp.beta == recipe["model"]["beta"] and hp.kl_beta == recipe["model"]["kl_beta"]
    assert hp.t_min == recipe["model"]["t_min"] and hp.old_policy and cli.model.old_policy is not None
    assert hp.old_policy_rollouts_after == (500 if task == "geneval" else 200)
    assert data.advantage_clip == 5.0 and data.advantage_std == recipe["data"]["advantage_std"]
    assert list(data.rewards) == [task]
    if cfg_free:
        assert data.guidance_scale == 1.0 and hp.reference_guidance_scale == 4.5 and hp.clip_range == 0.001
    else:
        assert data.guidance_scale == 4.5 and hp.reference_guidance_scale is None
        assert hp.clip_range == recipe["model"]["clip_range"]
    trained = [p for n, p in cli.model.backbone.denoiser.named_parameters() if "lora_B" in n]
    if task == "pickscore":  # the tiny CLIP gives each group a spread, so the one step moves the adapter
        assert trained and any(bool(p.abs().sum() > 0) for p in trained)
    assert f"eval/{task}" in cli.trainer.callback_metrics  # the validation loop ran with the task's reward
    ema = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMAWeightAveraging"]
    assert len(ema) == 1 and ema[0]._device == torch.device("cpu")
    assert (tmp_path / "run" / "final" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
