"""What the world's training scripts share (image and video pretraining, distillation): task-balanced
prompt draws, fresh renders with optional caption noise, the flow-matching loss, and the resumable
optimisation state of pretraining."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import torch

from dgpo_lightning.algo.flow import denoising_error, flow_interpolate, velocity_target
from dgpo_lightning.models.ema import ema_update_
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


class PretrainingState:
    """The optimisation state both world pretraining scripts (images and videos) share, and resume.

    AdamW on every parameter of ``model`` with a linear learning-rate warm-up over ``warmup`` steps and,
    when ``max_steps`` and ``decay_steps`` are given, a linear decay to 10% over the last ``decay_steps``;
    gradients clipped to norm 1; an EMA of the weights (what the scripts save) whose decay warms up as
    ``min(ema_decay, (1 + step) / (10 + step))`` (diffusers' EMAModel), so early averages do not drag
    the random initialisation along; a running loss ``0.98·avg + 0.02·loss``; and the data generator
    (prompt draws, renders, noise). :meth:`save` / :meth:`resume` round-trip all of it, so a resumed run
    continues bit for bit.
    """

    def __init__(
        self, model: torch.nn.Module, *, lr: float, warmup: int, ema_decay: float, seed: int,
        max_steps: int | None = None, decay_steps: int = 0, weight_decay: float = 0.0,
    ):
        self.model = model
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.ema_decay = ema_decay
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

        def lr_factor(step: int) -> float:  # a plain function: LambdaLR's state_dict then stores nothing of it
            factor = min(1.0, (step + 1) / max(1, warmup))
            if max_steps is not None and decay_steps:
                factor *= min(1.0, max(0.1, (max_steps - step) / decay_steps))
            return factor

        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.generator = torch.Generator().manual_seed(seed)
        self.step, self.loss_avg, self.history, self.minutes_before = 0, None, [], 0.0

    def update(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``, then the EMA and the running loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        ema_update_(self.ema.parameters(), self.model.parameters(), decay)  # the world models have no buffers
        value = loss.item()
        self.loss_avg = value if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * value

    def save(self, path: Path, minutes: float) -> None:
        torch.save(
            {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
             "schedule": self.schedule.state_dict(), "generator": self.generator.get_state(), "step": self.step,
             "loss": self.loss_avg, "history": self.history, "minutes": minutes},
            path,
        )

    def resume(self, path: Path) -> bool:
        """Load a state written by :meth:`save`; ``False`` (nothing loaded) when ``path`` does not exist."""
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        self.step, self.loss_avg, self.history, self.minutes_before = state["step"], state["loss"], state["history"], state["minutes"]
        return True
