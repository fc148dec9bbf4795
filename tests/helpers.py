"""Small builders shared by several test files (importable because tests/conftest.py's folder is on
sys.path under pytest's default import mode)."""

from __future__ import annotations

import torch

from dgpo_lightning.algo import group_advantages
from dgpo_lightning.data.prompts import load_prompt_records
from dgpo_lightning.objectives import GroupBatch
from dgpo_lightning.world.scene import TAGS

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle"]


def random_group_batch(latent_shape, n_groups: int = 3, group_size: int = 4, seed: int = 1) -> GroupBatch:
    """``n_groups`` whole groups of random latents and rewards (group ids 10, 11, ...)."""
    generator = torch.Generator().manual_seed(seed)
    n = n_groups * group_size
    group_index = torch.arange(10, 10 + n_groups).repeat_interleave(group_size)
    rewards = torch.rand(n, generator=generator)
    return GroupBatch(
        latents=torch.randn(n, *latent_shape, generator=generator),
        prompts=[p for p in PROMPTS[:n_groups] for _ in range(group_size)],
        advantages=group_advantages(rewards, group_index),
        rewards=rewards,
        group_index=group_index,
        sigmas=torch.linspace(1, 0, 5),
    )


def one_record_per_task(split: str = "test") -> list[dict]:
    """The first record of each GenEval task in a shipped world split, in GenEval's task order."""
    seen: dict[str, dict] = {}
    for record in load_prompt_records(f"world:{split}"):
        seen.setdefault(record["tag"], record)
    return [seen[tag] for tag in TAGS]


def send_json(handler, status: int, payload) -> None:
    """Answer an ``http.server`` request with ``payload`` as JSON; a client that already gave up
    (the timeout tests) is not an error of the test server."""
    import json

    data = json.dumps(payload).encode()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
