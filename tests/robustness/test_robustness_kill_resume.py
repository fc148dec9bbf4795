"""SIGKILL in the middle of training; the same command resumes and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BASE = Path(__file__).resolve().parents[2] / "experiments" / "base" / "world_dgpo.yaml"


def command(world_path, root):
    return [
        sys.executable, "-m", "dgpo_lightning", "fit", "--config", str(BASE),
        f"--model.model_path={world_path}", "--model.lr=1e-3", "--model.finetune=full", "--model.reference=ema",
        "--data.group_size=3", "--data.prompts_per_rank=2", "--data.groups_per_batch=2", "--data.num_steps=2", "--data.passes_per_rollout=2",
        "--data.rewards={sharpness: 1.0}", "--data.eval_prompts=null", "--data.progress=false",
        "--trainer.max_epochs=40", "--trainer.check_val_every_n_epoch=100", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
    ]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def final_weights(root):
    return load_file(next(Path(root).glob("**/final/unet/diffusion_pytorch_model.safetensors")))


@pytest.mark.distributed  # spawns training processes
def test_sigkill_then_same_command_resumes_exactly(tmp_path, tiny_world_path):
    straight = tmp_path / "straight"
    subprocess.run(command(tiny_world_path, straight), env=env(), check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(tiny_world_path, killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    last = killed / "tb" / "checkpoints" / "last.ckpt"
    writes = set()
    while time.time() < deadline and process.poll() is None and len(writes) < 3:
        if last.exists():
            writes.add(last.stat().st_mtime_ns)
        time.sleep(0.005)
    assert len(writes) >= 3, "the run wrote fewer than 3 checkpoints before it ended"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(killed.glob("**/final")), "the run was killed too late to test anything"
    torch.load(next(killed.glob("**/last.ckpt")), weights_only=False)  # readable after the kill: written atomically

    resumed = subprocess.run(command(tiny_world_path, killed), env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
