"""explore_dgpo_run.ipynb on a diffusers backbone's run: the tiny SD3 pipeline trained with LoRA through the
CLI, explored from its run directory (base pipeline from model.model_path + final/adapter)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from dgpo_lightning.cli import DGPOCLI
from dgpo_lightning.models.testing import build_tiny_sd3

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "explore_dgpo_run.ipynb"


def test_explore_notebook_reads_a_tiny_sd3_lora_run(tmp_path, monkeypatch):
    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    run = tmp_path / "run"
    DGPOCLI(args=[
        "fit", "--config", str(ROOT / "experiments" / "base" / "world_dgpo.yaml"),
        "--model.backbone=sd3", f"--model.model_path={tmp_path / 'sd3'}",
        '--model.backbone_options={"resolution": 32, "torch_dtype": "float32"}', "--model.lora_rank=4",
        f"--data.train_prompts={prompts}", f"--data.eval_prompts={prompts}",
        "--data.rewards={jpeg_incompressibility: 1.0}", "--data.eval_rewards=[jpeg_incompressibility]",
        "--data.group_size=2", "--data.prompts_per_rank=2", "--data.groups_per_batch=2", "--data.num_steps=2",
        "--data.eval_num_steps=2", "--data.eval_images_per_prompt=1", "--data.skip_zero_std_groups=false",
        "--data.progress=false", "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={run}",
        "--trainer.callbacks.init_args.metric=eval/jpeg_incompressibility",  # ScoreHistory (last callback)
    ])
    assert (run / "final" / "adapter").is_dir() and not (run / "final" / "unet").exists()
    assert (run / "eval_history.csv").exists()

    monkeypatch.setenv("DGPO_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("DGPO_RUN_DIR", str(run))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
    assert "backbone sd3" in text and "skipped (needs the embedded world)" in text
    assert [o for o in outputs if "image/png" in o.get("data", {})]  # the samples and curves were drawn
