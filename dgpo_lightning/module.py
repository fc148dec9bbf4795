"""``DGPOModule``: the online denoiser, its frozen reference and the group preference loss.

The maths lives in :mod:`dgpo_lightning.algo` and :mod:`dgpo_lightning.sampling`; this module only
arranges tensors, switches between online and reference weights and logs. The same module also
trains the paper's baselines (``algorithm="flow_grpo"`` on SDE trajectories, ``"diffusion_dpo"`` on
best/worst pairs) so comparisons share everything but the objective.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import lightning as L
import torch
from torch import Tensor, nn

from dgpo_lightning.algo import (
    best_worst_pairs,
    denoising_error,
    dgpo_group_weight,
    dgpo_loss,
    diffusion_dpo_loss,
    flow_grpo_loss,
    flow_interpolate,
    group_weights,
    ppo_clip_mask,
    sample_timesteps,
    velocity_kl,
    velocity_target,
)
from dgpo_lightning.models.backbone import concat_conditioning, index_conditioning
from dgpo_lightning.sampling import sde_step_log_prob

Algorithm = Literal["dgpo", "flow_grpo", "diffusion_dpo"]


class DGPOModule(L.LightningModule):
    """Online RL fine-tuning of a text-to-image flow model with DGPO (or a baseline).

    Args:
        backbone: ``"world"`` (embedded model) or ``"sd3"``; ``model_path``: checkpoint dir / hub id
            (``None`` with ``world`` = the shipped base); ``backbone_options``: extra loader kwargs.
        algorithm: ``dgpo`` | ``flow_grpo`` | ``diffusion_dpo``.
        finetune: ``full`` (reference = frozen copy of the denoiser) or ``lora`` (peft adapter;
            reference = the same weights with the adapter disabled).
        lora_rank, lora_alpha, lora_targets: adapter shape (``alpha`` defaults to ``2·rank``).
        beta: ``β`` of the implicit reward ``R = −(β/|g|)(ℓ_θ − ℓ_ref)`` (DGPO, Diffusion-DPO).
        t_min, t_max: training timesteps ``t ~ U[t_min, t_max]`` (timestep clipping; t = 1 is noise).
        t_min_final, t_min_anneal_epochs: an adaptive clip: ``t_min`` moves linearly to
            ``t_min_final`` over ``t_min_anneal_epochs`` rollout epochs (``None``: constant).
        timesteps_per_sample: ``K`` timesteps per sample per training step; the per-sample
            denoising error is their mean (Flow-GRPO: ``K`` trajectory steps per training step).
        group_weighting: per-sample weights in the group sum: ``advantage`` (the paper's ``A_i``),
            ``rank`` or ``softmax`` (see :func:`dgpo_lightning.algo.group_weights`).
        reference: ``initial`` (the starting weights) or ``ema`` (the official code's dynamic reference:
            an EMA of the online weights with ``reference_decay``; full fine-tuning only).
        kl_beta: weight of the velocity-space KL to the reference.
        clip_range: Flow-GRPO's ratio clip; for DGPO, with ``reference="ema"``, the official
            PPO-style clip on the denoising loss against the slow reference (``None`` disables it).
        train_guidance_scale: CFG scale of the velocities in the loss (the paper trains without CFG).
        reference_guidance_scale: CFG scale of the reference's velocities only (``None``: the same as
            ``train_guidance_scale``). The official code's ``kl_cfg`` mode: with CFG-free rollouts
            (``data.guidance_scale 1``) and a guided reference (e.g. 4.5), the implicit reward and the
            KL term measure the policy against the guided model, distilling guidance into it.
        lr, weight_decay: AdamW over the trainable parameters only.
        grad_clip: gradient-norm clip (``None``: off). The module optimises manually (micro-batches),
            so this replaces the Trainer's ``gradient_clip_val``.
        micro_batch_size: samples per forward/backward pass (``None``: the whole batch). Larger groups
            than fit in memory are split with exact gradients (see ``_dgpo_step``).
        gradient_checkpointing: recompute the denoiser's activations in backward (diffusers' own
            ``enable_gradient_checkpointing``): less memory for ~30% more compute.
        offload_reference: full fine-tuning only: keep the frozen reference copy on the CPU and
            move it to the accelerator just for its forward passes (saves a model's worth of
            accelerator memory for two host-device copies of it per training step).
        seed: timesteps and noise of step ``s`` on rank ``r`` are drawn from ``(seed, s, r)``, so a
            resumed run repeats exactly what an uninterrupted one would do.
    """

    def __init__(
        self,
        backbone: Literal["world", "sd3"] = "world",
        model_path: str | None = None,
        backbone_options: dict[str, Any] | None = None,
        algorithm: Algorithm = "dgpo",
        finetune: Literal["full", "lora"] = "full",
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
        beta: float = 30.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
        t_min_final: float | None = None,
        t_min_anneal_epochs: int = 1,
        timesteps_per_sample: int = 1,
        group_weighting: Literal["advantage", "rank", "softmax"] = "advantage",
        reference: Literal["initial", "ema"] = "initial",
        reference_decay: float = 0.99,
        kl_beta: float = 0.0,
        clip_range: float | None = None,
        train_guidance_scale: float = 1.0,
        reference_guidance_scale: float | None = None,
        lr: float = 3e-5,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        micro_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
        offload_reference: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        _check(beta >= 0 and math.isfinite(beta), "model.beta", beta, "must be a finite number >= 0")
        _check(0.0 <= t_min < 1.0, "model.t_min", t_min, "must lie in [0, 1) (t = 1 is pure noise)")
        _check(t_min < t_max <= 1.0, "model.t_max", t_max, f"must lie in (t_min={t_min}, 1]")
        _check(
            t_min_final is None or 0.0 <= t_min_final < t_max, "model.t_min_final", t_min_final, "must lie in [0, t_max)"
        )
        _check(t_min_anneal_epochs >= 1, "model.t_min_anneal_epochs", t_min_anneal_epochs, "must be >= 1")
        _check(timesteps_per_sample >= 1, "model.timesteps_per_sample", timesteps_per_sample, "must be >= 1")
        _check(0.0 < reference_decay < 1.0, "model.reference_decay", reference_decay, "must lie in (0, 1)")
        _check(kl_beta >= 0, "model.kl_beta", kl_beta, "must be >= 0")
        _check(clip_range is None or clip_range > 0, "model.clip_range", clip_range, "must be > 0 or null")
        _check(
            reference_guidance_scale is None or reference_guidance_scale > 0,
            "model.reference_guidance_scale",
            reference_guidance_scale,
            "must be > 0 or null",
        )
        _check(lr > 0, "model.lr", lr, "must be > 0")
        _check(grad_clip is None or grad_clip > 0, "model.grad_clip", grad_clip, "must be > 0 or null")
        _check(micro_batch_size is None or micro_batch_size >= 1, "model.micro_batch_size", micro_batch_size, "must be >= 1 or null")
        _check(lora_rank >= 1, "model.lora_rank", lora_rank, "must be >= 1")
        _check(
            not (reference == "ema" and finetune == "lora"),
            "model.reference",
            reference,
            "'ema' needs finetune=full (with LoRA the reference is the adapter-disabled base)",
        )
        _check(
            not offload_reference or finetune == "full",
            "model.offload_reference",
            offload_reference,
            "needs finetune=full (with LoRA the reference is the base weights the online model uses)",
        )
        _check(
            algorithm != "flow_grpo" or clip_range is not None, "model.clip_range", clip_range, "is required by flow_grpo"
        )
        self.save_hyperparameters()
        # Manual optimisation: one optimizer step per batch of whole groups, with as many
        # micro-batch backward passes as memory requires.
        self.automatic_optimization = False
        self.backbone: nn.Module | None = None
        self.reference_denoiser: nn.Module | None = None
        # Checkpoints hold only what training changes (frozen weights are reloaded from model_path);
        # see on_save_checkpoint.
        self.strict_loading = False
        self._frozen_weights_changed = False

    # ------------------------------------------------------------------ model construction

    @property
    def needs_trajectory(self) -> bool:
        """Flow-GRPO trains on the stored SDE transitions; the data module keeps them when asked."""
        return self.hparams.algorithm == "flow_grpo"

    def configure_model(self) -> None:
        """Load the backbone, freeze everything but the trained weights and set up the reference.

        Idempotent; Lightning calls it inside the strategy's context (FSDP), and it may be called by
        hand before using ``module.backbone`` outside a Trainer.
        """
        if self.backbone is not None:
            return
        from dgpo_lightning.models.factory import load_backbone

        hp = self.hparams
        backbone = load_backbone(hp.backbone, hp.model_path, **(hp.backbone_options or {}))
        backbone.requires_grad_(False)
        denoiser = backbone.denoiser
        if hp.finetune == "lora":
            from dgpo_lightning.models.lora import add_lora

            add_lora(denoiser, rank=hp.lora_rank, alpha=hp.lora_alpha, target_modules=hp.lora_targets)
        else:
            self.reference_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()
            denoiser.requires_grad_(True)
        if hp.gradient_checkpointing:
            if not hasattr(denoiser, "enable_gradient_checkpointing"):
                raise ValueError(f"model.gradient_checkpointing: {type(denoiser).__name__} does not support it")
            denoiser.enable_gradient_checkpointing()
        self.backbone = backbone
        self._shard()

    def _shard(self) -> None:
        """FSDP2: shard the denoiser (and the reference copy) over the data-parallel mesh.

        Active under Lightning's ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``,
        which hands the module a device mesh before ``configure_model``. Each transformer/UNet block is
        its own shard unit, so only one block's full weights are gathered at a time. Text encoders and
        VAE stay replicated (frozen, used under no_grad).
        """
        mesh = self._device_mesh
        if mesh is None or "data_parallel" not in (mesh.mesh_dim_names or ()):
            return
        data_parallel = mesh["data_parallel"]
        if data_parallel.size() == 1:
            return
        if self.hparams.offload_reference:
            raise ValueError("model.offload_reference: not supported with FSDP sharding (the reference copy is sharded instead)")
        from torch.distributed.fsdp import fully_shard

        for model in (self.backbone.denoiser, self.reference_denoiser):
            if model is None:
                continue
            for block in _shard_units(model):
                fully_shard(block, mesh=data_parallel)
            fully_shard(model, mesh=data_parallel)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.denoiser.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError("no trainable parameters: check model.finetune / model.lora_targets")
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @contextmanager
    def reference_weights(self) -> Iterator[None]:
        """Inside the block, ``self.backbone`` computes with the reference weights (no gradients)."""
        with torch.no_grad():
            if self.reference_denoiser is None:
                from dgpo_lightning.models.lora import reference_mode

                with reference_mode(self.backbone.denoiser):
                    yield
            else:
                online = self.backbone.denoiser
                with self._reference_on_device():
                    self.backbone.denoiser = self.reference_denoiser
                    try:
                        yield
                    finally:
                        self.backbone.denoiser = online

    @contextmanager
    def _reference_on_device(self) -> Iterator[None]:
        """With ``offload_reference`` the frozen copy waits on the CPU and visits the online
        denoiser's device only for the reference forward passes (and the EMA update)."""
        if not self.hparams.offload_reference or self.reference_denoiser is None:
            yield
            return
        self.reference_denoiser.to(next(self.backbone.denoiser.parameters()).device)
        try:
            yield
        finally:
            self.reference_denoiser.to("cpu")

    def _offload_idle(self) -> None:
        """Undo the Trainer's move of the whole module to the accelerator for offloaded parts."""
        if self.hparams.offload_reference and self.reference_denoiser is not None:
            self.reference_denoiser.to("cpu")
        offload = getattr(self.backbone, "offload_idle", None)
        if callable(offload):
            offload()

    def on_fit_start(self) -> None:
        self._offload_idle()

    def on_validation_start(self) -> None:
        self._offload_idle()

    def on_test_start(self) -> None:
        self._offload_idle()

    # ------------------------------------------------------------------ training

    def _generator(self, salt: int = 0) -> torch.Generator:
        seed = (int(self.hparams.seed) * 1_000_003 + int(self.global_step)) * 65_537 + int(salt)
        return torch.Generator().manual_seed(seed)

    @property
    def current_t_min(self) -> float:
        """``t_min`` of the current epoch (constant unless ``t_min_final`` is set)."""
        hp = self.hparams
        if hp.t_min_final is None:
            return hp.t_min
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        progress = min(1.0, epoch / hp.t_min_anneal_epochs)
        return hp.t_min + (hp.t_min_final - hp.t_min) * progress

    def _noisy_copies(self, x0: Tensor, groups: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``K`` noisy versions of each sample with timesteps and noise shared inside each group.

        Group ``group_ids[g]``'s timesteps and noise at optimizer step ``s`` come from
        ``(seed, s, group id)`` alone, so a group trains the same whichever rank or batch holds it.

        Args:
            x0: ``[N, ...]`` clean latents; ``groups``: ``[N]`` dense group position ``0..P-1``;
            group_ids: ``[P]`` global group ids.

        Returns ``x_t, t, v_target`` stacked k-major: ``[K·N, ...]``, ``[K·N]``, ``[K·N, ...]``."""
        hp = self.hparams
        k = hp.timesteps_per_sample
        draws_t, draws_noise = [], []
        for gid in group_ids.tolist():
            generator = self._generator(gid)
            draws_t.append(sample_timesteps(1, k, t_min=self.current_t_min, t_max=hp.t_max, generator=generator)[0])
            draws_noise.append(torch.randn((k, *x0.shape[1:]), generator=generator))
        t, noise = torch.stack(draws_t), torch.stack(draws_noise)
        t = t.to(x0.device, x0.dtype)[groups].T.reshape(-1)
        noise = noise.to(x0.device, x0.dtype)[groups].transpose(0, 1).reshape(-1, *x0.shape[1:])
        x0 = x0.repeat(k, *([1] * (x0.dim() - 1)))
        return flow_interpolate(x0, noise, t), t, velocity_target(x0, noise)

    def _reference_velocity(self, x_t: Tensor, t: Tensor, cond, guidance_scale: float) -> Tensor:
        if self.hparams.reference_guidance_scale is not None:
            guidance_scale = self.hparams.reference_guidance_scale
        with self.reference_weights():
            return self._chunked_velocity(x_t, t, cond, guidance_scale)

    def _chunked_velocity(self, x_t: Tensor, t: Tensor, cond, guidance_scale: float) -> Tensor:
        """Velocity over all rows, ``micro_batch_size`` rows at a time (for no-grad passes)."""
        size = self.hparams.micro_batch_size or x_t.shape[0]
        parts = [
            self.backbone.velocity(x_t[i : i + size], t[i : i + size], index_conditioning(cond, slice(i, i + size)), guidance_scale=guidance_scale)
            for i in range(0, x_t.shape[0], size)
        ]
        return torch.cat(parts)

    def _sample_chunks(self, n: int) -> list[Tensor]:
        size = self.hparams.micro_batch_size or n
        return [torch.arange(i, min(i + size, n), device=self.device) for i in range(0, n, size)]

    def _backward_chunks(self, chunks: list[Tensor], loss_of_chunk) -> None:
        """``manual_backward`` of ``loss_of_chunk(idx)`` for each chunk; gradient sync across ranks
        only on the last one."""
        strategy = self.trainer.strategy
        for number, idx in enumerate(chunks):
            last = number == len(chunks) - 1
            block = getattr(strategy, "block_backward_sync", None)
            if not last and block is not None:
                with block():
                    self.manual_backward(loss_of_chunk(idx))
            else:
                self.manual_backward(loss_of_chunk(idx))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        step = {"dgpo": self._dgpo_step, "flow_grpo": self._flow_grpo_step, "diffusion_dpo": self._dpo_step}
        loss, logs = step[self.hparams.algorithm](batch)
        if self.hparams.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        n = int(batch["latents"].shape[0])
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=n, sync_dist=True)
        self.log("train/loss", loss, batch_size=n, prog_bar=True, sync_dist=True)
        return loss

    @staticmethod
    def _rows(idx: Tensor, n: int, k: int) -> Tensor:
        """Rows of samples ``idx`` in a k-major ``[K·N]`` stack."""
        return (torch.arange(k, device=idx.device)[:, None] * n + idx[None, :]).reshape(-1)

    def _dgpo_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """DGPO loss and its gradient, exact for any ``micro_batch_size``.

        Whole batch in one pass: ``dgpo_loss`` on everything. Micro-batches: a no-grad pass over the
        whole batch gives every group's sigmoid weight ``σ(z_g)``; each micro-batch then
        back-propagates ``dgpo_loss(..., group_weight=σ(z_g))`` whose gradients sum to the exact
        whole-batch gradient (see :func:`dgpo_lightning.algo.dgpo_loss`)."""
        hp = self.hparams
        k = hp.timesteps_per_sample
        x0 = batch["latents"].to(self.device)
        n = x0.shape[0]
        advantages = batch["advantages"].to(self.device)
        group_ids, groups = batch["group_index"].to(self.device).unique(return_inverse=True)
        num_groups = group_ids.numel()
        weights = group_weights(advantages, groups, scheme=hp.group_weighting)
        x_t, t, target = self._noisy_copies(x0, groups, group_ids)
        cond = self.backbone.encode_prompts(list(batch["prompts"]))
        cond = concat_conditioning([cond] * k) if k > 1 else cond
        guidance = hp.train_guidance_scale
        v_reference = self._reference_velocity(x_t, t, cond, guidance)
        dsm_reference = denoising_error(v_reference, target).view(k, n).mean(0)
        chunks = self._sample_chunks(n)

        def online_errors(idx: Tensor) -> tuple[Tensor, Tensor]:
            rows = self._rows(idx, n, k)
            v = self.backbone.velocity(x_t[rows], t[rows], index_conditioning(cond, rows), guidance_scale=guidance)
            dsm = denoising_error(v, target[rows]).view(k, -1).mean(0)
            kl = velocity_kl(v, v_reference[rows]).view(k, -1).mean(0)
            return dsm, kl

        if len(chunks) == 1:
            dsm_online, kl = online_errors(chunks[0])
        else:
            with torch.no_grad():
                dsm_online, kl = map(torch.cat, zip(*(online_errors(idx) for idx in chunks)))
        logs: dict[str, Tensor] = {}
        keep = torch.ones(n, dtype=torch.bool, device=self.device)
        if hp.clip_range is not None and hp.reference == "ema":
            keep = ppo_clip_mask(dsm_online, dsm_reference, weights, hp.clip_range)
            logs["clip_frac"] = 1.0 - keep.float().mean()
        clipped = lambda dsm, idx: torch.where(keep[idx], dsm, dsm.detach())  # noqa: E731
        loss, stats = dgpo_loss(clipped(dsm_online, slice(None)), dsm_reference, weights, groups, beta=hp.beta)
        loss = loss + hp.kl_beta * kl.mean()
        if len(chunks) == 1:
            self.manual_backward(loss)
        else:
            sigmoid = dgpo_group_weight(dsm_online, dsm_reference, weights, groups, beta=hp.beta)
            sizes = torch.bincount(groups)[groups]

            def chunk_loss(idx: Tensor) -> Tensor:
                dsm, kl_chunk = online_errors(idx)
                part, _ = dgpo_loss(
                    clipped(dsm, idx), dsm_reference[idx], weights[idx], groups[idx], beta=hp.beta,
                    group_weight=sigmoid[idx], group_size=sizes[idx], num_groups=num_groups,
                )
                return part + hp.kl_beta * kl_chunk.sum() / n

            self._backward_chunks(chunks, chunk_loss)
        logs.update(
            dgpo_sigmoid_weight=stats.sigmoid_weight,
            reward_margin=stats.reward_margin,
            reward_accuracy=stats.reward_accuracy,
            zero_advantage_frac=stats.zero_advantage_frac,
            kl=kl.mean().detach(),
            dsm_gap=(dsm_online - dsm_reference).mean().detach(),
        )
        return loss.detach(), logs

    def _dpo_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Online Diffusion-DPO on each group's best/worst pair (winner and loser share t and noise)."""
        hp = self.hparams
        k = hp.timesteps_per_sample
        winners, losers = best_worst_pairs(batch["rewards"], batch["group_index"])
        if winners.numel() == 0:
            raise ValueError("diffusion_dpo got a batch without any pair of different rewards; set data.skip_zero_std_groups=true")
        pairs = torch.cat([winners, losers])
        num_pairs = winners.numel()
        x0 = batch["latents"][pairs].to(self.device)
        pair_of = torch.arange(num_pairs, device=self.device).repeat(2)
        x_t, t, target = self._noisy_copies(x0, pair_of, batch["group_index"][winners])
        cond = self.backbone.encode_prompts([batch["prompts"][i] for i in pairs.tolist()])
        cond = concat_conditioning([cond] * k) if k > 1 else cond
        guidance = hp.train_guidance_scale
        v_reference = self._reference_velocity(x_t, t, cond, guidance)
        dsm_reference = denoising_error(v_reference, target).view(k, 2 * num_pairs).mean(0)
        stats_parts, losses = [], []

        def chunk_loss(idx: Tensor) -> Tensor:  # idx: pair numbers; winner i and loser num_pairs + i
            members = torch.cat([idx, idx + num_pairs])
            rows = self._rows(members, 2 * num_pairs, k)
            v = self.backbone.velocity(x_t[rows], t[rows], index_conditioning(cond, rows), guidance_scale=guidance)
            dsm = denoising_error(v, target[rows]).view(k, -1).mean(0)
            kl = velocity_kl(v, v_reference[rows]).mean()
            m = idx.numel()
            loss, stats = diffusion_dpo_loss(
                dsm[:m], dsm_reference[idx], dsm[m:], dsm_reference[idx + num_pairs], beta=hp.beta
            )
            loss = (loss + hp.kl_beta * kl) * (m / num_pairs)
            losses.append(loss.detach())
            stats_parts.append((m / num_pairs, stats, kl.detach()))
            return loss

        self._backward_chunks(self._sample_chunks(num_pairs), chunk_loss)
        return torch.stack(losses).sum(), _chunk_weighted_stats(stats_parts, rename={"sigmoid_weight": "dpo_sigmoid_weight"})

    def _flow_grpo_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-GRPO's clipped policy gradient on ``K`` stored SDE transitions per sample."""
        hp = self.hparams
        if "trajectory" not in batch or "log_probs" not in batch:
            raise ValueError("flow_grpo trains on SDE transitions: set data.sampler=sde")
        trajectory = batch["trajectory"].to(self.device)  # [N, S + 1, ...]
        old_log_probs = batch["log_probs"].to(self.device)  # [N, S]
        sigmas = batch["sigmas"].to(self.device)
        advantages = batch["advantages"].to(self.device)
        n = old_log_probs.shape[0]
        # A step ending at sigma = 0 is deterministic (no noise), so it has no likelihood to train.
        candidates = (sigmas[1:] > 0).nonzero().flatten()
        k = min(hp.timesteps_per_sample, candidates.numel())
        salt = int(batch["group_index"].min())
        steps = candidates[torch.randperm(candidates.numel(), generator=self._generator(salt))[:k].to(self.device)]
        x_t = trajectory[:, steps].transpose(0, 1).reshape(k * n, *trajectory.shape[2:])
        x_next = trajectory[:, steps + 1].transpose(0, 1).reshape(k * n, *trajectory.shape[2:])
        sigma = sigmas[steps].repeat_interleave(n)
        sigma_next = sigmas[steps + 1].repeat_interleave(n)
        cond = self.backbone.encode_prompts(list(batch["prompts"]))
        cond = concat_conditioning([cond] * k) if k > 1 else cond
        guidance = float(batch.get("guidance_scale", hp.train_guidance_scale))
        noise_level = float(batch.get("noise_level", 0.7))
        v_reference = self._reference_velocity(x_t, sigma, cond, guidance) if hp.kl_beta > 0 else None
        # Flow-GRPO puts the per-dimension mean log-density in the ratio (a sum over thousands of
        # dimensions would overflow exp(log-ratio) after the first update).
        dims = x_t[0].numel()
        old = old_log_probs[:, steps].T.reshape(-1) / dims
        adv = advantages.repeat(k)
        stats_parts, losses = [], []

        def chunk_loss(idx: Tensor) -> Tensor:
            rows = self._rows(idx, n, k)
            v = self.backbone.velocity(x_t[rows], sigma[rows], index_conditioning(cond, rows), guidance_scale=guidance)
            log_probs = sde_step_log_prob(v, x_t[rows], x_next[rows], sigma[rows], sigma_next[rows], noise_level=noise_level) / dims
            loss, stats = flow_grpo_loss(log_probs, old[rows], adv[rows], clip_range=hp.clip_range)
            kl = velocity_kl(v, v_reference[rows]).mean() if v_reference is not None else v.new_zeros(())
            weight = idx.numel() / n
            loss = (loss + hp.kl_beta * kl) * weight
            losses.append(loss.detach())
            stats_parts.append((weight, stats, kl.detach()))
            return loss

        self._backward_chunks(self._sample_chunks(n), chunk_loss)
        return torch.stack(losses).sum(), _chunk_weighted_stats(stats_parts)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hparams.reference == "ema" and self.reference_denoiser is not None:
            with torch.no_grad(), self._reference_on_device():
                online = [p.detach() for p in self.backbone.denoiser.parameters()]
                reference = list(self.reference_denoiser.parameters())
                torch._foreach_lerp_(reference, online, 1.0 - self.hparams.reference_decay)

    def reset_reference(self) -> None:
        """Make the current online weights the new reference (the reference-switching schedule).

        Full fine-tuning copies the weights; with LoRA the adapter is folded into the base weights
        and zeroed, which leaves the online model unchanged and moves the reference to it."""
        self._frozen_weights_changed = True
        if self.reference_denoiser is not None:
            with torch.no_grad():
                for ref, online in zip(self.reference_denoiser.parameters(), self.backbone.denoiser.parameters()):
                    ref.copy_(online)
        else:
            from dgpo_lightning.models.lora import fold_lora

            fold_lora(self.backbone.denoiser)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen weights that ``configure_model`` reloads from ``model_path`` anyway.

        A Lightning checkpoint of SD3.5-M with LoRA would otherwise carry the whole pipeline (T5-XXL
        included) every epoch. Kept: trainable weights, metric states, the reference when it moves
        (``reference="ema"``), and everything once a reference switch has changed frozen weights.
        """
        checkpoint["frozen_weights_changed"] = self._frozen_weights_changed
        if self._frozen_weights_changed or self.backbone is None:
            return
        frozen = {f"backbone.{name}" for name, p in self.backbone.named_parameters() if not p.requires_grad}
        if self.hparams.reference != "ema":
            frozen |= {f"reference_denoiser.{name}" for name, _ in (self.reference_denoiser or nn.Module()).named_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        self._frozen_weights_changed = bool(checkpoint.get("frozen_weights_changed", False))
        own = self.state_dict()
        missing_trainable = [
            f"backbone.{n}" for n, p in self.backbone.named_parameters() if p.requires_grad and f"backbone.{n}" not in checkpoint["state_dict"]
        ]
        unexpected = [k for k in checkpoint["state_dict"] if k not in own]
        if missing_trainable or unexpected:
            raise RuntimeError(
                f"checkpoint does not match this model: missing trained weights {missing_trainable[:5]}, "
                f"unexpected keys {unexpected[:5]} (same model.backbone/finetune/lora settings?)"
            )

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        rollout = getattr(datamodule, "last_rollout", None)
        if rollout is not None:
            stats = {k: torch.tensor(v, dtype=torch.float32) for k, v in rollout.stats().items()}
            self.log_dict(stats, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ held-out evaluation

    def setup(self, stage: str) -> None:
        precision = str(getattr(self._trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        if self.hparams.algorithm == "flow_grpo" and precision in ("bf16-true", "16-true"):
            raise ValueError(
                f"trainer.precision={precision!r} rounds Flow-GRPO's stored trajectories to half precision, so "
                "its first update is already off-policy and clipped; use bf16-mixed (or 32-true)"
            )
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "eval_reward_names") or hasattr(self, "eval_metrics"):
            return
        from torchmetrics import MeanMetric

        # One metric per (reward, task), created up front: every rank must own the same metrics
        # for the cross-rank sync, whatever prompts its shard holds.
        keys = [f"{name}/{tag}" for name in datamodule.eval_reward_names for tag in ["all", *datamodule.eval_tags()]]
        self.eval_metrics = nn.ModuleDict({_metric_key(k): MeanMetric(nan_strategy="error") for k in keys})
        self.last_eval_examples: dict[str, Any] | None = None
        self.last_eval: dict[str, float] = {}

    def _eval_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        from dgpo_lightning.data.rollout import sample_latents

        datamodule = self.trainer.datamodule
        hp = datamodule.hparams
        records = [item["record"] for item in batch]
        prompts = [r["prompt"] for r in records]
        output = sample_latents(
            self.backbone,
            prompts,
            [item["seed"] for item in batch],
            sampler=hp.eval_sampler,
            num_steps=hp.eval_num_steps,
            shift=hp.shift,
            guidance_scale=hp.guidance_scale,
            batch_size=hp.eval_batch_size,
        )
        images = self.backbone.decode(output.sample)
        tags = [str(r.get("tag", "all")) for r in records]
        scores_by_reward = {}
        for name, reward in datamodule.eval_rewards.items():
            scores = reward(images, prompts, records).detach().float().to(self.device)
            scores_by_reward[name] = scores
            self.eval_metrics[_metric_key(f"{name}/all")].update(scores)
            for tag in set(tags) & set(datamodule.eval_tags()):
                mask = torch.tensor([t == tag for t in tags], device=self.device)
                self.eval_metrics[_metric_key(f"{name}/{tag}")].update(scores[mask])
        if batch_idx == 0:
            self.last_eval_examples = {"images": images.cpu(), "prompts": prompts, "scores": scores_by_reward}

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def _eval_epoch_end(self) -> None:
        datamodule = self.trainer.datamodule
        tags = datamodule.eval_tags()
        results: dict[str, float] = {}
        for name in datamodule.eval_reward_names:
            per_task = {}
            for tag in tags:
                metric = self.eval_metrics[_metric_key(f"{name}/{tag}")]
                if metric.update_count > 0 or self.trainer.world_size > 1:
                    value = metric.compute()
                    if torch.isfinite(value):
                        per_task[tag] = float(value)
                metric.reset()
            overall = self.eval_metrics[_metric_key(f"{name}/all")]
            mean = float(overall.compute())
            overall.reset()
            # GenEval's "overall" is the unweighted mean of its task scores.
            results[f"eval/{name}"] = sum(per_task.values()) / len(per_task) if per_task else mean
            results.update({f"eval/{name}/{tag}": value for tag, value in per_task.items()})
        self.last_eval = results
        if results:
            self.log_dict(results, sync_dist=False)  # already synchronised by torchmetrics
            self.log("hp_metric", results[f"eval/{datamodule.eval_reward_names[0]}"], sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end()


def _chunk_weighted_stats(parts, rename: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Micro-batch diagnostics ``[(weight, stats NamedTuple, kl), ...]`` → their weighted sums."""
    out: dict[str, Tensor] = {}
    for weight, stats, kl in parts:
        for key, value in {**stats._asdict(), "kl": kl}.items():
            key = (rename or {}).get(key, key)
            out[key] = out.get(key, 0) + weight * value
    return out


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a denoiser: SD3's ``transformer_blocks`` or a UNet's down/mid/up blocks."""
    units: list[nn.Module] = []
    for name in ("transformer_blocks", "down_blocks", "up_blocks"):
        units.extend(getattr(model, name, None) or [])
    if getattr(model, "mid_block", None) is not None:
        units.append(model.mid_block)
    return units


def _metric_key(key: str) -> str:
    # ModuleDict keys may not contain dots or slashes.
    return key.replace("/", "__").replace(".", "_")


def _check(ok: bool, key: str, value: Any, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {message}")
