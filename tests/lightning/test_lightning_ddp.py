"""Data parallel on CPU (gloo): 2 ranks x B groups give the same loss and gradient as 1 rank x 2B
groups, with DDP and with FSDP2 (Lightning's ModelParallelStrategy + fully_shard)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_equivalence_script.py")


def _run(world_path, out, devices, parallel="ddp", finetune="full"):
    # Each distributed fit in its own process: two in one pytest process collide on the port.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(world_path), str(out), str(devices), parallel, finetune],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.distributed
def test_ddp_two_ranks_equal_one_rank_with_all_groups(tmp_path, tiny_world_path):
    single = _run(tiny_world_path, tmp_path / "single.pt", 1)
    ddp = _run(tiny_world_path, tmp_path / "ddp.pt", 2)
    assert single["grad"].abs().max() > 0
    # Summation order differs between one process and the gloo all-reduce: float32 tolerance
    # relative to the gradient's scale.
    scale = single["grad"].abs().max().item()
    torch.testing.assert_close(ddp["grad"], single["grad"], rtol=1e-4, atol=1e-5 * scale)
    assert (ddp["grad"] - single["grad"]).norm() < 1e-5 * single["grad"].norm()
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fsdp2_two_ranks_equal_one_rank(tmp_path, tiny_world_path, finetune):
    single = _run(tiny_world_path, tmp_path / "single.pt", 1, finetune=finetune)
    sharded = _run(tiny_world_path, tmp_path / "fsdp.pt", 2, parallel="fsdp", finetune=finetune)
    scale = single["grad"].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(sharded["grad"], single["grad"], rtol=1e-4, atol=1e-5 * scale)
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
