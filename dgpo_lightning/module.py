"""``DGPOModule``: the Lightning glue around a backbone, its reference and a training objective.

The maths lives in :mod:`dgpo_lightning.algo` (losses), :mod:`dgpo_lightning.objectives` (one file
per algorithm: DGPO, Flow-GRPO, online Diffusion-DPO, DiffusionNFT, TDM-R1), :mod:`dgpo_lightning.models.reference` (the
reference and the old policy) and :mod:`dgpo_lightning.evaluation` (held-out evaluation). This
module builds them, runs the optimizer, logs and trims checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from dgpo_lightning import objectives
from dgpo_lightning.callbacks.resume import resume_at_next_epoch
from dgpo_lightning.errors import check
from dgpo_lightning.objectives import GroupBatch, TrainContext, TrainingSettings


def _MovingAverage(model: nn.Module) -> nn.Module:
    """An EMA of ``model``'s trainable tensors whose decay the caller gives each time
    (``AuxiliarySetup.moving_average``): the old policy's weight swap, another schedule."""
    from dgpo_lightning.models.ema import ema_update_
    from dgpo_lightning.models.reference import OldPolicy

    class MovingAverage(OldPolicy):
        def update_with(self, decay: float) -> None:
            ema_update_(list(self.averaged), self._trained(), decay)

    return MovingAverage(model, decay_max=0.0, decay_rate=0.0)


class DGPOModule(L.LightningModule):
    """Online RL fine-tuning of a text-to-image flow model with DGPO (or a baseline).

    Args:
        backbone: a registered backbone name (``world``, ``sd3``); ``model_path``: checkpoint dir /
            hub id (``None`` with ``world`` = the shipped base); ``backbone_options``: loader kwargs.
        algorithm: a registered objective (``dgpo`` | ``flow_grpo`` | ``diffusion_dpo`` | ``diffusion_nft`` | ``tdm_r1``);
            ``algorithm_options``: that objective's own options.
        finetune: ``full`` (reference = frozen copy of the denoiser) or ``lora`` (peft adapter;
            reference = the same weights with the adapter disabled).
        lora_rank, lora_alpha, lora_targets: adapter shape (``alpha`` defaults to ``2·rank``).
        beta: ``β`` of the implicit reward ``R = −(β/|g|)(ℓ_θ − ℓ_ref)`` (DGPO, Diffusion-DPO).
        t_min, t_max: training timesteps ``t ~ U[t_min, t_max]`` (timestep clipping; t = 1 is noise).
        t_min_final, t_min_anneal_epochs: ``t_min`` moves linearly to ``t_min_final`` over
            ``t_min_anneal_epochs`` rollout epochs (``None``: constant).
        timesteps_per_sample: ``K`` timesteps per sample per training step (Flow-GRPO: ``K``
            trajectory steps).
        group_weighting: DGPO's per-sample weights: ``advantage`` (the paper's ``A_i``), ``rank``, ``softmax``.
        reference: ``initial`` (the starting weights) or ``ema`` (an EMA of the online weights with
            ``reference_decay``; full fine-tuning only).
        kl_beta: weight of the velocity-space KL to the reference.
        clip_range: Flow-GRPO's ratio clip; for DGPO the official PPO-style clip on the denoising
            loss against the old policy (``old_policy``) or, without one, the EMA reference.
        old_policy: keep the official recipe's fast EMA "old" policy (decay
            ``min(old_policy_decay_max, old_policy_decay_rate · step)``) for DGPO's clip, next to a
            frozen reference: three models, as the official training script runs.
        old_policy_rollouts_after: from this optimizer step on, rollouts sample with the old
            policy's weights instead of the online ones (the official recipe: 500 for GenEval, 200
            for OCR and PickScore; ``None``: always the online weights). Needs ``old_policy``.
        train_guidance_scale: CFG scale of the velocities in the loss (the paper trains without CFG).
        reference_guidance_scale: CFG scale of the reference's velocities only (``None``: the same as
            ``train_guidance_scale``); the official ``kl_cfg`` mode with CFG-free rollouts.
        optimizer: a callable ``params -> Optimizer`` (YAML: ``class_path: torch.optim.X`` +
            ``init_args``); ``None``: AdamW with ``lr`` and ``weight_decay`` (the official recipe's
            optimizer). ``lr_scheduler``: an optional callable ``optimizer -> LRScheduler``, stepped
            once per optimizer step.
        grad_clip: gradient-norm clip (``None``: off); replaces the Trainer's ``gradient_clip_val``
            (the module optimises manually, for micro-batches).
        micro_batch_size: samples per forward/backward pass (``None``: the whole batch), with exact
            gradients (see :func:`dgpo_lightning.objectives.micro_batched_backward`).
        gradient_checkpointing: recompute the denoiser's activations in backward.
        offload_reference: full fine-tuning: keep the frozen reference copy on the CPU except for
            its forward passes.
        seed: timesteps and noise of step ``s`` for group ``g`` are drawn from ``(seed, s, g)``.

    Auxiliary models. An objective may declare extra models (``Objective.auxiliary_models``; TDM-R1:
    teacher, fake score, surrogate reward, old surrogate). ``configure_model`` builds them from the
    freshly loaded backbone into ``self.auxiliary`` (so the Trainer moves them and checkpoints hold
    them); ``configure_optimizers`` returns the online optimizer first, then one AdamW per trained
    auxiliary model; the objective steps those inside its step (``TrainContext.step_auxiliary``, plain
    optimizer steps, so ``global_step`` counts the online model's steps only); their frozen weights are
    trimmed from checkpoints unless they move (an EMA copy).
    """

    def __init__(
        self,
        backbone: str = "world",
        model_path: str | None = None,
        backbone_options: dict[str, Any] | None = None,
        algorithm: str = "dgpo",
        algorithm_options: dict[str, Any] | None = None,
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
        old_policy: bool = False,
        old_policy_decay_max: float = 0.3,
        old_policy_decay_rate: float = 1e-3,
        old_policy_rollouts_after: int | None = None,
        train_guidance_scale: float = 1.0,
        reference_guidance_scale: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr: float = 3e-5,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        micro_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
        offload_reference: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        from dgpo_lightning.models.factory import available_backbones

        known = available_backbones()
        check(backbone in known, "model.backbone", backbone, f"is not a known backbone; choose one of: {', '.join(known)}")
        check(t_min_final is None or (finite(t_min_final) and 0.0 <= t_min_final < t_max), "model.t_min_final", t_min_final, "must lie in [0, t_max)")
        check(t_min_anneal_epochs >= 1, "model.t_min_anneal_epochs", t_min_anneal_epochs, "must be >= 1")
        check(finite(lr) and lr > 0, "model.lr", lr, "must be a finite number > 0")
        check(finite(weight_decay) and weight_decay >= 0, "model.weight_decay", weight_decay, "must be >= 0")
        defaults = inspect.signature(DGPOModule.__init__).parameters
        check(
            optimizer is None or (lr == defaults["lr"].default and weight_decay == defaults["weight_decay"].default),
            "model.lr", lr, "configures the default AdamW only: with model.optimizer set, give lr/weight_decay in its init_args",
        )
        check(grad_clip is None or (finite(grad_clip) and grad_clip > 0), "model.grad_clip", grad_clip, "must be > 0 or null")
        check(lora_rank >= 1, "model.lora_rank", lora_rank, "must be >= 1")
        from dgpo_lightning.models.reference import OldPolicy, Reference

        Reference.check_options(lora=finetune == "lora", kind=reference, decay=reference_decay, offload=offload_reference)
        OldPolicy.check_options(decay_max=old_policy_decay_max, decay_rate=old_policy_decay_rate)
        objective_class = objectives.get(algorithm)
        check(
            not (objective_class.uses_old_policy and clip_range is not None and not old_policy and reference != "ema"),
            "model.clip_range", clip_range,
            f"{algorithm}'s clip compares with an old policy: set model.old_policy=true (the official recipe) "
            "or model.reference=ema, or clip_range=null",
        )
        check(not old_policy or objective_class.uses_old_policy, "model.old_policy", old_policy, f"is not used by {algorithm}")
        check(
            old_policy_rollouts_after is None or (old_policy and isinstance(old_policy_rollouts_after, int) and old_policy_rollouts_after >= 0),
            "model.old_policy_rollouts_after", old_policy_rollouts_after, "needs model.old_policy=true and an integer step >= 0",
        )
        self.save_hyperparameters()
        # The callables themselves (under LightningCLI, hparams hold their configs instead).
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.objective = objective_class(self.training_settings(), **(algorithm_options or {}))
        # Manual optimisation: one optimizer step per batch of whole groups, with as many
        # micro-batch backward passes as memory requires.
        self.automatic_optimization = False
        self.backbone: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.old_policy: nn.Module | None = None
        #: The objective's auxiliary models (``Objective.auxiliary_models``), built in configure_model.
        self.auxiliary: nn.ModuleDict | None = None
        self.auxiliary_specs: dict[str, Any] = {}
        self._standalone_optimizers: list[torch.optim.Optimizer] | None = None
        # Checkpoints hold only what training changes (frozen weights are reloaded from model_path).
        self.strict_loading = False
        self.last_eval: dict[str, float] = {}
        self.last_eval_examples: dict[str, Any] | None = None

    # ------------------------------------------------------------------ model construction

    @property
    def needs_trajectory(self) -> bool:
        """Whether rollouts must keep every sampler state (the data module reads it)."""
        return self.objective.needs.trajectory

    def training_settings(self) -> TrainingSettings:
        """The objective's shared settings, with the current (possibly annealed) ``t_min``."""
        hp = self.hparams
        return TrainingSettings(
            beta=hp.beta, t_min=self.current_t_min, t_max=hp.t_max, timesteps_per_sample=hp.timesteps_per_sample,
            group_weighting=hp.group_weighting, kl_beta=hp.kl_beta, clip_range=hp.clip_range,
            train_guidance_scale=hp.train_guidance_scale, reference_guidance_scale=hp.reference_guidance_scale,
            micro_batch_size=hp.micro_batch_size,
        )

    def configure_model(self) -> None:
        """Load the backbone, freeze everything but the trained weights, set up the reference.

        Idempotent; Lightning calls it inside the strategy's context (FSDP), and it may be called by
        hand before using ``module.backbone`` outside a Trainer.
        """
        if self.backbone is not None:
            return
        from dgpo_lightning.models.factory import load_backbone
        from dgpo_lightning.models.reference import OldPolicy, Reference

        hp = self.hparams
        backbone = load_backbone(hp.backbone, hp.model_path, **(hp.backbone_options or {}))
        backbone.requires_grad_(False)
        denoiser = backbone.denoiser
        self._build_auxiliary(backbone)
        if hp.finetune == "lora":
            from dgpo_lightning.models.lora import add_lora

            targets = hp.lora_targets or getattr(backbone, "lora_targets", None) or None  # the backbone's peers' default
            add_lora(denoiser, rank=hp.lora_rank, alpha=hp.lora_alpha, target_modules=targets)
        self.reference = Reference(
            backbone, lora=hp.finetune == "lora", kind=hp.reference, decay=hp.reference_decay, offload=hp.offload_reference
        )
        if hp.finetune == "full":
            denoiser.requires_grad_(True)
        if hp.old_policy:
            self.old_policy = OldPolicy(denoiser, decay_max=hp.old_policy_decay_max, decay_rate=hp.old_policy_decay_rate)
        if hp.gradient_checkpointing:
            check(hasattr(denoiser, "enable_gradient_checkpointing"), "model.gradient_checkpointing", True,
                  f"is not supported by {type(denoiser).__name__}")
            denoiser.enable_gradient_checkpointing()
        self.backbone = backbone
        self._shard()

    def _build_auxiliary(self, backbone) -> None:
        """The objective's auxiliary models, from the freshly loaded (adapter-free) backbone."""
        from dgpo_lightning.models.factory import load_backbone
        from dgpo_lightning.objectives.base import AuxiliarySetup

        hp = self.hparams

        def load_denoiser(path: str) -> nn.Module:
            return load_backbone(hp.backbone, path, **(hp.backbone_options or {})).denoiser.requires_grad_(False)

        targets = hp.lora_targets or getattr(backbone, "lora_targets", None) or None

        def trainable_copy(denoiser: nn.Module, finetune: str = "full", rank: int = 8, alpha: float | None = None) -> nn.Module:
            model = copy.deepcopy(denoiser).requires_grad_(False)
            if finetune == "full":
                return model.requires_grad_(True)
            from dgpo_lightning.models.lora import add_lora

            add_lora(model, rank=rank, alpha=alpha, target_modules=targets)
            return model

        setup = AuxiliarySetup(backbone, load_denoiser, trainable_copy, _MovingAverage, targets)
        specs = self.objective.auxiliary_models(setup)
        if not specs:
            return
        self.auxiliary_specs = dict(specs)
        self.auxiliary = nn.ModuleDict({name: spec.module for name, spec in specs.items()})
        for name, spec in specs.items():
            if spec.trained and not any(p.requires_grad for p in spec.module.parameters()):
                raise RuntimeError(f"auxiliary model {name!r} of {hp.algorithm} is declared trained but has no trainable parameters")

    def _shard(self) -> None:
        """FSDP2: shard the denoiser (and the reference copy) over the data-parallel mesh.

        Active under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``, which
        hands the module a device mesh before ``configure_model``. Each transformer/UNet block is its
        own shard unit; text encoders and VAE stay replicated (frozen, used under no_grad).
        """
        mesh = self._device_mesh
        if mesh is None or "data_parallel" not in (mesh.mesh_dim_names or ()) or mesh["data_parallel"].size() == 1:
            return
        check(not self.hparams.offload_reference, "model.offload_reference", True, "is not supported with FSDP sharding")
        check(self.old_policy is None, "model.old_policy", True, "is not supported with FSDP sharding yet")
        check(self.auxiliary is None, "model.algorithm", self.hparams.algorithm, "has auxiliary models, not supported with FSDP sharding yet")
        from dgpo_lightning.models.sharding import shard_denoisers

        shard_denoisers((self.backbone.denoiser, self.reference.frozen), mesh["data_parallel"])

    def rollout_weights(self):
        """Context in which the datamodule samples rollouts: the old policy's weights from step
        ``old_policy_rollouts_after`` on, else the online weights (a no-op context)."""
        after = self.hparams.old_policy_rollouts_after
        if self.old_policy is not None and after is not None and self.global_step >= after:
            return self.old_policy.weights()
        return contextlib.nullcontext()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.denoiser.parameters() if p.requires_grad]

    def configure_optimizers(self):
        """The online model's optimizer (and scheduler), then one AdamW per trained auxiliary model
        with ``lr_scale ×`` the online optimizer's learning rate (Lightning checkpoints them all; the
        scheduler drives the online optimizer only)."""
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError("no trainable parameters: check model.finetune / model.lora_targets")
        hp = self.hparams
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = self.optimizer_factory(params)
        auxiliary = self._auxiliary_optimizers(optimizer.param_groups[0]["lr"])
        if self.scheduler_factory is None:
            return [optimizer, *auxiliary] if auxiliary else optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}
        if auxiliary:
            return [optimizer, *auxiliary], [scheduler]
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _auxiliary_optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        optimizers = []
        for name, spec in self.auxiliary_specs.items():
            if not spec.trained:
                continue
            params = [p for p in spec.module.parameters() if p.requires_grad]
            decay = hp.weight_decay if spec.weight_decay is None else spec.weight_decay
            optimizers.append(torch.optim.AdamW(params, lr=lr * spec.lr_scale, betas=tuple(spec.betas), weight_decay=decay))
        return optimizers

    def auxiliary_optimizer(self, name: str) -> torch.optim.Optimizer:
        """The (plain torch) optimizer of trained auxiliary model ``name``: Lightning's under a
        Trainer, else built once from ``configure_optimizers`` (use outside a Trainer)."""
        trained = [n for n, spec in self.auxiliary_specs.items() if spec.trained]
        if name not in trained:
            raise KeyError(f"{self.hparams.algorithm} has no trained auxiliary model {name!r} (trained: {trained})")
        if self._trainer is not None:
            optimizers = self.optimizers(use_pl_optimizer=False)
        else:
            if self._standalone_optimizers is None:
                configured = self.configure_optimizers()
                self._standalone_optimizers = list(configured[0] if isinstance(configured, tuple) else configured)
            optimizers = self._standalone_optimizers
        return optimizers[1 + trained.index(name)]

    def _step_auxiliary(self, name: str) -> None:
        optimizer = self.auxiliary_optimizer(name)
        clip = self.hparams.grad_clip
        if clip is not None:
            if self._trainer is not None:
                self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            else:
                torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
        # The plain optimizer, not Lightning's wrapper: trainer.global_step counts the online model's
        # steps only (max_steps, schedules and the per-step draws stay those of the other objectives).
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _offload_idle(self) -> None:
        """Undo the Trainer's move of the whole module to the accelerator for offloaded parts."""
        self.reference.offload_idle()
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

    @property
    def current_t_min(self) -> float:
        """``t_min`` of the current epoch (constant unless ``t_min_final`` is set)."""
        hp = self.hparams
        if hp.t_min_final is None:
            return hp.t_min
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        progress = min(1.0, epoch / hp.t_min_anneal_epochs)
        return hp.t_min + (hp.t_min_final - hp.t_min) * progress

    def train_context(self) -> TrainContext:
        """What the objective may use this step: the models, the seeded draws and the backward."""
        def old(x_t, t, cond, guidance_scale):
            with self.old_policy.weights():
                return self.backbone.velocity(x_t, t, cond, guidance_scale=guidance_scale)

        strategy = self._trainer.strategy if self._trainer is not None else None
        return TrainContext(
            self.backbone,
            lambda x_t, t, cond, guidance_scale: self.reference.velocity(x_t, t, cond, guidance_scale),
            old_velocity=old if self.old_policy is not None else None,
            backward=self.manual_backward if self._trainer is not None else (lambda loss: loss.backward()),
            no_sync=getattr(strategy, "block_backward_sync", None),
            seed=self.hparams.seed,
            step=self.global_step,
            device=self.device,
            auxiliary=dict(self.auxiliary.items()) if self.auxiliary is not None else None,
            step_auxiliary=self._step_auxiliary if any(spec.trained for spec in self.auxiliary_specs.values()) else None,
        )

    def backward_step(self, batch: GroupBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective's loss on ``batch`` with its gradients accumulated (no optimizer step)."""
        self.objective.settings = self.training_settings()
        output = self.objective.step(batch, self.train_context())
        return output.loss, output.stats

    def training_step(self, batch: GroupBatch, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        if isinstance(optimizer, list):  # the online model's comes first, then the auxiliary models'
            optimizer = optimizer[0]
        optimizer.zero_grad(set_to_none=True)
        loss, logs = self.backward_step(batch)
        if self.hparams.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        n = len(batch)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=n, sync_dist=True)
        self.log("train/loss", loss, batch_size=n, prog_bar=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.reference.update()
        if self.old_policy is not None:
            # global_step already counts the step just taken; the schedule counts from 0.
            self.old_policy.update(self.global_step - 1)

    def reset_reference(self) -> None:
        """Make the current online weights the new reference (the reference-switching schedule)."""
        self.reference.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen weights that ``configure_model`` reloads from ``model_path`` anyway.

        A Lightning checkpoint of SD3.5-M with LoRA would otherwise carry the whole pipeline (T5-XXL
        included) every epoch. Kept: trainable weights, the old policy, the reference when it moves
        (``reference="ema"``), and everything once a reference switch has changed frozen weights.
        """
        changed = self.reference is not None and self.reference.frozen_weights_changed
        checkpoint["frozen_weights_changed"] = changed
        if changed or self.backbone is None:
            return
        frozen = {f"backbone.{name}" for name, p in self.backbone.named_parameters() if not p.requires_grad}
        if not self.reference.moves:
            frozen |= {f"reference.{name}" for name, _ in self.reference.named_parameters()}
        for name, spec in self.auxiliary_specs.items():
            if not spec.checkpoint_frozen:  # a teacher, the base under an adapter: rebuilt by configure_model
                frozen |= {f"auxiliary.{name}.{key}" for key, p in spec.module.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning restores its loops from ``checkpoint``.
        self._resumed_between_epochs = resume_at_next_epoch(checkpoint)
        self.configure_model()
        self.reference.frozen_weights_changed = bool(checkpoint.get("frozen_weights_changed", False))
        own = self.state_dict()
        missing_trainable = [
            f"backbone.{n}" for n, p in self.backbone.named_parameters() if p.requires_grad and f"backbone.{n}" not in checkpoint["state_dict"]
        ]
        for name, spec in self.auxiliary_specs.items():
            missing_trainable += [
                f"auxiliary.{name}.{n}" for n, p in spec.module.named_parameters()
                if (p.requires_grad or spec.checkpoint_frozen) and f"auxiliary.{name}.{n}" not in checkpoint["state_dict"]
            ]
        unexpected = [k for k in checkpoint["state_dict"] if k not in own]
        if missing_trainable or unexpected:
            raise RuntimeError(
                f"checkpoint does not match this model: missing trained weights {missing_trainable[:5]}, "
                f"unexpected keys {unexpected[:5]} (same model.backbone/finetune/lora settings?)"
            )

    def on_train_start(self) -> None:
        # An epoch-end checkpoint resumes at the start of the next epoch, exactly as a new epoch starts
        # in an uninterrupted run: Lightning's iteration-based (max_steps) restart would otherwise redo
        # the finished epoch (a new rollout and one extra step) or count a phantom logging step.
        if getattr(self, "_resumed_between_epochs", False):
            self.trainer.fit_loop.epoch_loop.restarting = False
            self._resumed_between_epochs = False

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        rollout = getattr(datamodule, "last_rollout", None)
        if rollout is not None:
            stats = {k: torch.tensor(v, dtype=torch.float32) for k, v in rollout.stats().items()}
            self.log_dict(stats, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ held-out evaluation

    def setup(self, stage: str) -> None:
        precision = str(getattr(self._trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        if self.objective.needs.trajectory and precision in ("bf16-true", "16-true"):
            raise ValueError(
                f"trainer.precision={precision!r} rounds {self.hparams.algorithm}'s stored trajectories to half precision, "
                "so its first update is already off-policy and clipped; use bf16-mixed (or 32-true)"
            )
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        sampler = getattr(getattr(datamodule, "hparams", None), "sampler", None)
        from dgpo_lightning.objectives.base import Objective

        # Before configure_model: whether the objective declares auxiliary models at all.
        if type(self.objective).auxiliary_models is not Objective.auxiliary_models and self._trainer is not None:
            check(precision not in ("16-mixed", "16"), "trainer.precision", precision,
                  f"is not supported by {self.hparams.algorithm}'s auxiliary optimizers (they step outside the grad scaler); use bf16-mixed or 32-true")
            check(int(getattr(self.trainer, "world_size", 1) or 1) == 1, "trainer.devices", getattr(self.trainer, "world_size", None),
                  f"{self.hparams.algorithm} trains auxiliary models with several backward passes per step, on one device only for now")
        check(self.objective.needs.sampler != "sde" or sampler in (None, "sde"), "data.sampler", sampler,
              f"cannot train {self.hparams.algorithm}: it needs SDE rollouts (data.sampler=sde)")
        if datamodule is None or not hasattr(datamodule, "eval_reward_names") or hasattr(self, "eval_metrics"):
            return
        from dgpo_lightning.evaluation import HeldOutMetrics, TaskExamples

        # Created up front: every rank must own the same metrics for the cross-rank sync.
        self.eval_metrics = HeldOutMetrics(datamodule.eval_reward_names, datamodule.eval_tags())
        self._examples = TaskExamples(per_task=4)

    def _eval_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        from dgpo_lightning.evaluation import generate_images, score_images, task_of

        datamodule = self.trainer.datamodule
        records = [item["record"] for item in batch]
        prompts = [r["prompt"] for r in records]
        seeds = [item["seed"] for item in batch]
        images = generate_images(self.backbone, prompts, seeds, datamodule.eval_settings, batch_size=datamodule.hparams.eval_batch_size)
        tags = [task_of(r) for r in records]
        scores = score_images(datamodule.eval_rewards, images, prompts, records)
        self.eval_metrics.update(scores, tags)
        self._examples.add(images.cpu(), prompts, tags, scores)  # a few per task, for the grid

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def _eval_epoch_end(self) -> None:
        from dgpo_lightning.evaluation import TaskExamples

        results = self.eval_metrics.compute()
        self.last_eval = results
        self.last_eval_examples, self._examples = self._examples.result(), TaskExamples(per_task=4)
        if results:
            self.log_dict(results, sync_dist=False)  # already synchronised by torchmetrics
            self.log("hp_metric", results[f"eval/{self.trainer.datamodule.eval_reward_names[0]}"], sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end()

