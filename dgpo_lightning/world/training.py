"""What the world's training scripts share (image and video pretraining, distillation): task-balanced
prompt draws, fresh renders with optional caption noise, and the flow-matching loss."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dgpo_lightning.algo.flow import denoising_error, flow_interpolate, velocity_target
from dgpo_lightning.world.scene import corrupt_metadata, random_choice, render_prompt


class TaskBalancedPrompts:
    """Draws prompt records: a task uniformly over the tasks present, then a record of that task."""

    def __init__(self, records: Sequence[dict], generator: torch.Generator):
        self.by_task: dict[str, list[dict]] = {}
        for record in records:
            self.by_task.setdefault(record["tag"], []).append(record)
        self.tasks = sorted(self.by_task)
        self.generator = generator

    def draw(self, count: int) -> list[dict]:
        tasks = torch.randint(len(self.tasks), (count,), generator=self.generator).tolist()
        return [random_choice(self.by_task[self.tasks[t]], self.generator) for t in tasks]


def render_batch(
    records: Sequence[dict],
    generator: torch.Generator,
    caption_noise: float = 0.0,
    *,
    render: Callable[[dict, torch.Generator], torch.Tensor] = render_prompt,
    corrupt: Callable[[dict, torch.Generator], dict] = corrupt_metadata,
) -> torch.Tensor:
    """Fresh random renders of ``records`` stacked (``[B, 3, 32, 32]`` scenes by default; the video world
    passes its clip renderer). With probability ``caption_noise`` per record the render is drawn for
    ``corrupt(record)`` instead (one attribute off; its caption stays)."""
    out = []
    for record in records:
        if caption_noise and float(torch.rand((), generator=generator)) < caption_noise:
            record = corrupt(record, generator)
        out.append(render(record, generator))
    return torch.stack(out)


def flow_matching_loss(backbone, x: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """Mean ``‖v_θ(x_t, t, c) − (ε − x0)‖²`` with ``t ~ U[0, 1]`` and ``x0 = backbone.encode(x)`` (images or videos)."""
    x0 = backbone.encode(x)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.rand(x0.shape[0], generator=generator)
    v = backbone.velocity(flow_interpolate(x0, noise, t), t, backbone.encode_prompts(prompts))
    return denoising_error(v, velocity_target(x0, noise)).mean()
