"""The models an objective compares the policy with: the reference and the fast-EMA "old" policy.

- :class:`Reference` — what the implicit reward and the KL term measure against: the starting
  weights (LoRA: the same network with its adapter disabled, nothing copied; full fine-tuning: a
  frozen copy) or a slow EMA of the online weights (the official code's dynamic reference), with
  reference switching (:meth:`Reference.reset`) and optional CPU offloading of the copy.
- :class:`OldPolicy` — the official recipe's third model: a fast EMA of the trained weights
  (decay ``min(decay_max, decay_rate · step)``) read only by the PPO-style clip.

Both swap weights into the one backbone instead of holding a second backbone, so prompt encoding,
CFG and the VAE are shared; they are plain ``nn.Module`` s (no Lightning) so that a Trainer moves and
checkpoints their tensors.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from dgpo_lightning.errors import check
from dgpo_lightning.models.backbone import Backbone, Conditioning
from dgpo_lightning.models.ema import ema_update_

ReferenceKind = Literal["initial", "ema"]


class Reference(nn.Module):
    """The reference model ``θ_ref`` of one online backbone.

    Args:
        backbone: the online backbone (its ``denoiser`` is the trained network).
        lora: the denoiser carries a LoRA adapter: the reference is the adapter-disabled network.
            Otherwise a frozen deep copy of the denoiser is kept (``self.frozen``).
        kind: ``initial`` (fixed starting weights) or ``ema`` (``θ_ref ← d·θ_ref + (1 − d)·θ`` after
            every optimizer step; copy only).
        decay: the EMA decay ``d`` of ``kind="ema"``.
        offload: keep the copy on the CPU and move it to the denoiser's device only while it computes.
    """

    def __init__(self, backbone: Backbone, *, lora: bool, kind: ReferenceKind = "initial", decay: float = 0.99, offload: bool = False):
        super().__init__()
        self.check_options(lora=lora, kind=kind, decay=decay, offload=offload)
        # Not a submodule: the backbone belongs to its owner (registering it twice would duplicate its
        # tensors in state dicts).
        self.__dict__["backbone"] = backbone
        self.kind, self.decay, self.offload, self.lora = kind, decay, offload, lora
        self.frozen: nn.Module | None = None if lora else copy.deepcopy(backbone.denoiser).requires_grad_(False).eval()
        #: Set once :meth:`reset` has changed weights that are otherwise reloaded from disk.
        self.frozen_weights_changed = False

    @staticmethod
    def check_options(*, lora: bool, kind: str, decay: float, offload: bool) -> None:
        """Refuse settings that cannot work, naming the config key (before any model is loaded)."""
        check(not (kind == "ema" and lora), "model.reference", kind,
              "'ema' needs finetune=full (with LoRA the reference is the adapter-disabled base)")
        check(not (offload and lora), "model.offload_reference", offload,
              "needs finetune=full (with LoRA the reference is the base weights the online model uses)")
        check(isinstance(decay, (int, float)) and 0.0 < decay < 1.0, "model.reference_decay", decay, "must lie in (0, 1)")

    @property
    def moves(self) -> bool:
        """Whether training changes the reference's weights (then checkpoints must keep them)."""
        return self.kind == "ema"

    @contextmanager
    def weights(self) -> Iterator[None]:
        """Inside the block ``backbone`` computes with the reference weights (no gradients)."""
        backbone = self.backbone
        with torch.no_grad():
            if self.frozen is None:
                from dgpo_lightning.models.lora import reference_mode

                with reference_mode(backbone.denoiser):
                    yield
                return
            online = backbone.denoiser
            with self._on_device():
                backbone.denoiser = self.frozen
                try:
                    yield
                finally:
                    backbone.denoiser = online

    def velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """``v_ref(x_t, t, c)`` (no gradients)."""
        with self.weights():
            return self.backbone.velocity(x_t, t, cond, guidance_scale=guidance_scale)

    @contextmanager
    def _on_device(self) -> Iterator[None]:
        if not self.offload or self.frozen is None:
            yield
            return
        self.frozen.to(next(self.backbone.denoiser.parameters()).device)
        try:
            yield
        finally:
            self.frozen.to("cpu")

    def offload_idle(self) -> None:
        """Send an offloaded copy back to the CPU (after a Trainer moved the whole module)."""
        if self.offload and self.frozen is not None:
            self.frozen.to("cpu")

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: the EMA reference follows the online weights (no-op otherwise)."""
        if self.kind != "ema" or self.frozen is None:
            return
        with self._on_device():
            ema_update_(self.frozen.parameters(), self.backbone.denoiser.parameters(), self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Make the current online weights the new reference (reference switching).

        Full fine-tuning copies the weights; with LoRA the adapter is folded into the base weights and
        zeroed, which leaves the online model unchanged and moves the reference to it."""
        self.frozen_weights_changed = True
        if self.frozen is None:
            from dgpo_lightning.models.lora import fold_lora

            fold_lora(self.backbone.denoiser)
            return
        for ref, online in zip(self.frozen.parameters(), self.backbone.denoiser.parameters()):
            ref.copy_(online)


class OldPolicy(nn.Module):
    """A fast EMA ``θ_old`` of the trained parameters, for the PPO-style clip (official DGPO recipe).

    After optimizer step ``s`` (counted from 0): ``θ_old ← d_s·θ_old + (1 − d_s)·θ`` with
    ``d_s = min(decay_max, decay_rate · s)`` (official: 0.3 and 0.001), so early on ``θ_old`` is the
    previous online weights and later a short average of the last few. Only trainable tensors are
    averaged (the LoRA weights with LoRA); :meth:`weights` swaps them into the network.

    Args:
        denoiser: the trained network.
        decay_max, decay_rate: the decay schedule.
    """

    def __init__(self, denoiser: nn.Module, *, decay_max: float = 0.3, decay_rate: float = 1e-3):
        super().__init__()
        self.check_options(decay_max=decay_max, decay_rate=decay_rate)
        self.__dict__["denoiser"] = denoiser
        self.decay_max, self.decay_rate = decay_max, decay_rate
        trained = self._trained()
        if not trained:
            raise ValueError("the old policy averages the trained parameters, and the denoiser has none")
        self.averaged = nn.ParameterList([nn.Parameter(p.detach().clone(), requires_grad=False) for p in trained])

    @staticmethod
    def check_options(*, decay_max: float, decay_rate: float) -> None:
        check(0.0 <= decay_max < 1.0, "model.old_policy_decay_max", decay_max, "must lie in [0, 1)")
        check(decay_rate >= 0.0, "model.old_policy_decay_rate", decay_rate, "must be >= 0")

    def _trained(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def decay_at(self, step: int) -> float:
        """``d_s = min(decay_max, decay_rate · s)``."""
        return min(self.decay_max, self.decay_rate * int(step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step``: move ``θ_old`` towards the online weights."""
        ema_update_(list(self.averaged), self._trained(), self.decay_at(step))

    @contextmanager
    def weights(self) -> Iterator[None]:
        """Inside the block the denoiser computes with ``θ_old`` (no gradients); the online tensors are
        swapped back on exit, untouched."""
        trained = self._trained()
        online = [p.data for p in trained]
        with torch.no_grad():
            for p, old in zip(trained, self.averaged):
                p.data = old.data
            try:
                yield
            finally:
                for p, data in zip(trained, online):
                    p.data = data


__all__ = ["OldPolicy", "Reference", "ReferenceKind"]
