"""benchmarks/bench_real_size_cpu.py: its byte arithmetic and outputs on a toy (fast), and SD3.5-Medium's
real widths with one block through the same path (``slow``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_real_size_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_real_size_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(result, saved, md):
    b = result["bytes"]
    assert saved["seconds"] == pytest.approx(result["seconds"])
    assert md.startswith(f"# {result['config']} at its published size") and result["command"] in md
    assert b["transformer_parameters"] == 2 * result["transformer_params"]  # bf16 base
    assert b["lora_dtypes"] == ["torch.float32"] and b["lora_parameters"] == 4 * result["trainable_params"]
    # AdamW: exp_avg and exp_avg_sq in fp32 per adapter tensor, plus a 4-byte step per tensor
    assert 2 * b["lora_parameters"] <= b["adamw_state"] <= 2 * b["lora_parameters"] + 8 * 10_000
    assert result["loss_finite"] and result["lora_grads_finite"] and result["rollout_velocity_finite"]
    assert result["rollout_rows"] == 2 * result["group_size"]  # CFG doubles the batch
    peaks = result["peak_rss_gib"]
    assert peaks["process"] >= peaks["process_start"] > 0
    for phase in ("build", "rollout_step", "train_step"):
        assert result["seconds"][phase] > 0
        assert peaks[phase] is None or 0 < peaks[phase] <= peaks["process"] + 0.05


def test_toy_run_writes_consistent_figures(bench, tmp_path):
    out = tmp_path / "real"
    result = bench.main(
        ["--config", "tiny", "--resolution", "32", "--text-tokens", "8", "--lora-rank", "4", "--out", str(out)]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    _check(result, saved, out.with_suffix(".md").read_text())
    assert result["text_tokens"] == 8 and result["latent_shape"] == [16, 4, 4] and result["lora_alpha"] == 8


def test_group_size_must_be_a_group(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--group-size", "1"])


@pytest.mark.slow
def test_sd35_medium_widths_with_one_block(bench, tmp_path):
    """SD3.5-Medium's real widths (1536, 4096-wide text, 384² positional table, rank-64 LoRA) with one
    block, through the benchmark's whole path."""
    out = tmp_path / "medium1"
    result = bench.main(
        ["--num-layers", "1", "--resolution", "32", "--text-tokens", "4", "--out", str(out)]
    )
    _check(result, json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text())
    config = result["transformer_config"]
    assert config["num_layers"] == 1 and config["num_attention_heads"] * config["attention_head_dim"] == 1536
    assert result["bytes"]["transformer_buffers"] == 2 * 384 * 384 * 1536  # the bf16 positional table
    assert torch.get_default_dtype() == torch.float32  # the bf16 build restored the default
