"""``RolloutDataModule``: regenerates a rollout with the current policy every epoch and serves whole groups."""

from __future__ import annotations

import contextlib
import math

from typing import Any, Iterator, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

import warnings

from dgpo_lightning.data.prompts import draw_prompts
from dgpo_lightning.data.validation import check_reward_weights, validate_prompt_file, world_vocabulary
from dgpo_lightning.errors import ConfigError
from dgpo_lightning.data.rollout import Rollout, generate_groups

#: Phases of a rollout's wall-clock (``rollout`` is the whole; scoring overlaps sampling, and
#: ``reward_wait`` is the part of it that sampling stood still waiting).
ROLLOUT_PHASES: tuple[str, ...] = ("rollout", "sampling", "scoring", "reward_wait")
from dgpo_lightning.rewards.base import available as available_rewards
from dgpo_lightning.rewards.base import build_weighted, reward_kind
from dgpo_lightning.sampling.seeds import resample_seed, rollout_seed
from dgpo_lightning.errors import check
from dgpo_lightning.sampling.settings import SamplerName, SamplerSettings



class _Batches(IterableDataset):
    """Pre-built batches of whole groups. An ``IterableDataset`` so Lightning never re-shards it:
    groups are assigned to ranks when prompts are drawn, and must not be split."""

    def __init__(self, batches: list[dict[str, Any]], passes: int):
        self.batches, self.passes = batches, passes

    def __len__(self) -> int:
        return len(self.batches) * self.passes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _ in range(self.passes):
            yield from self.batches


def _collate(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class RolloutDataModule(L.LightningDataModule):
    """Online group rollouts for DGPO and its baselines.

    Each epoch, every rank draws ``prompts_per_rank`` prompts (tag-balanced, seeded by epoch and rank),
    samples ``group_size`` images per prompt with the policy being trained (``trainer.lightning_module``,
    so set ``reload_dataloaders_every_n_epochs=1``), scores them with the weighted ``rewards`` and
    serves batches of ``groups_per_batch`` whole groups, ``passes_per_rollout`` times over.

    Args:
        train_prompts: jsonl (GenEval schema) or txt prompt file; ``world:train`` is the embedded split.
        group_size: ``G >= 2`` images per prompt.
        prompts_per_rank: prompts per rollout on each rank.
        groups_per_batch: whole groups per training batch.
        passes_per_rollout: how many times each rollout batch is trained on (fresh timesteps each time).
        sampler, num_steps, shift, guidance_scale, noise_level: rollout sampler (``shift=None`` and
            ``guidance_scale=None`` take the backbone's recommended values; ``noise_level`` is the SDE's ``a``).
        rewards: ``{name: weight}`` of registered rewards; ``reward_options``: ``{name: kwargs}``.
        advantage_std: normalise advantages by the ``group`` or ``global`` reward std.
        advantage_clip: clip advantages to ``±advantage_clip`` (the official recipe: 5; ``None``: off).
        skip_zero_std_groups: do not train on groups whose rewards are all equal (zero advantages
            give zero DGPO gradient; skipping them saves the compute). Every rank then trains on the
            same number of batches (the minimum over ranks) so no rank waits in a collective.
        balance_tags: draw prompts evenly across GenEval task families.
        rollout_batch_size: images per sampler call; also the chunk that is scored while the next
            one is sampled.
        overlap_scoring: score each chunk of rollout images in a worker thread while the next is
            sampled (same numbers as in turn; ``rollout/reward_wait_seconds`` logs the waits).
        seed: base seed of prompt draws and rollout noise.
        eval_prompts: held-out prompt file of the validation loop (``None``: no validation).
        eval_images_per_prompt: images per held-out prompt (GenEval uses 4).
        eval_min_images_per_task: more images per prompt for tasks with few held-out prompts, at
            least this many per task (``0``: off); see ``sampling.seeds.evaluation_plan``.
        eval_rewards: rewards reported on held-out prompts; they may include rewards that are never
            trained on (out-of-domain checks). Reported as ``eval/<name>`` and ``eval/<name>/<tag>``.
        eval_sampler, eval_num_steps: the evaluation sampler (deterministic ODE by default).
        eval_batch_size: held-out images per validation batch.
        eval_seed: seed of the held-out images (fixed, so every evaluation sees the same noise).
    """

    def __init__(
        self,
        train_prompts: str = "world:train",
        group_size: int = 8,
        prompts_per_rank: int = 8,
        groups_per_batch: int = 1,
        passes_per_rollout: int = 1,
        sampler: SamplerName = "ode_dpm",
        num_steps: int = 10,
        shift: float | None = None,
        guidance_scale: float | None = None,
        noise_level: float = 0.7,
        rewards: dict[str, float] | None = None,
        reward_options: dict[str, dict[str, Any]] | None = None,
        advantage_std: Literal["group", "global"] = "group",
        advantage_clip: float | None = None,
        skip_zero_std_groups: bool = True,
        balance_tags: bool = True,
        rollout_batch_size: int = 64,
        overlap_scoring: bool = True,
        seed: int = 0,
        progress: bool = True,
        eval_prompts: str | None = "world:test",
        eval_images_per_prompt: int = 4,
        eval_min_images_per_task: int = 0,
        eval_rewards: list[str] | None = None,
        eval_sampler: SamplerName = "ode_dpm",
        eval_num_steps: int = 10,
        eval_batch_size: int = 64,
        eval_seed: int = 1234,
    ):
        super().__init__()
        rewards = {"geneval_partial": 1.0} if rewards is None else dict(rewards)
        check(group_size >= 2, "data.group_size", group_size, "must be >= 2 (a group needs a preference)")
        check(prompts_per_rank >= 1, "data.prompts_per_rank", prompts_per_rank, "must be >= 1")
        check(groups_per_batch >= 1, "data.groups_per_batch", groups_per_batch, "must be >= 1")
        check(
            advantage_clip is None or (isinstance(advantage_clip, (int, float)) and math.isfinite(advantage_clip) and advantage_clip > 0),
            "data.advantage_clip", advantage_clip, "must be a finite number > 0 or null",
        )
        check(
            groups_per_batch <= prompts_per_rank,
            "data.groups_per_batch",
            groups_per_batch,
            f"must be <= data.prompts_per_rank={prompts_per_rank} (a batch holds whole groups of one rank)",
        )
        check(passes_per_rollout >= 1, "data.passes_per_rollout", passes_per_rollout, "must be >= 1")
        check(num_steps >= 1, "data.num_steps", num_steps, "must be >= 1")
        check(shift is None or shift > 0, "data.shift", shift, "must be > 0 or null")
        check(noise_level >= 0, "data.noise_level", noise_level, "must be >= 0")
        check(bool(rewards), "data.rewards", rewards, "needs at least one reward")
        eval_rewards = ["geneval"] if eval_rewards is None else list(eval_rewards)
        for key, names in (("data.rewards", rewards), ("data.eval_rewards", eval_rewards)):
            unknown = sorted(n for n in names if reward_kind(n, (reward_options or {}).get(n)) not in available_rewards())
            check(not unknown, key, unknown, f"names unknown rewards; available: {available_rewards()} "
                  "(a label of your own needs data.reward_options.<label>.kind naming one of them)")
        check(eval_images_per_prompt >= 1, "data.eval_images_per_prompt", eval_images_per_prompt, "must be >= 1")
        check(eval_min_images_per_task >= 0, "data.eval_min_images_per_task", eval_min_images_per_task, "must be >= 0")
        rewards = check_reward_weights(rewards, key="data.rewards")
        self.save_hyperparameters()
        # Everything about the prompts is checked now, before any model is loaded (see
        # data/validation.py); the text encoder's vocabulary and the world size are checked in setup().
        options = dict(reward_options or {})
        self.train_file = validate_prompt_file(
            train_prompts, key="data.train_prompts", rewards=list(rewards), reward_options=options,
            min_distinct_prompts=prompts_per_rank, count_hint=self._count_hint(1),
        )
        self.eval_file = (
            validate_prompt_file(eval_prompts, key="data.eval_prompts", rewards=eval_rewards, reward_options=options)
            if eval_prompts else None
        )
        self.records = self.train_file.records
        self.eval_records = self.eval_file.records if self.eval_file is not None else []
        self.eval_reward_names = eval_rewards
        self._eval_rewards = None
        self.images_generated = 0
        self.rewards = rewards
        self.reward_options = dict(reward_options or {})
        self._reward = None
        self.last_rollout: Rollout | None = None
        self.rollouts_done = 0
        self.last_resamples = 0
        #: Cumulative rollout time on this rank, by phase (every rollout, resampled ones included).
        self.rollout_seconds = dict.fromkeys(ROLLOUT_PHASES, 0.0)

    @property
    def reward(self):
        if self._reward is None:
            self._reward = build_weighted(self.rewards, **self.reward_options)
        return self._reward

    @property
    def rollout_settings(self) -> SamplerSettings:
        """The rollout sampler (unresolved: ``None`` shift/CFG take the backbone's defaults)."""
        hp = self.hparams
        return SamplerSettings(hp.sampler, hp.num_steps, hp.shift, hp.guidance_scale, hp.noise_level)

    @property
    def eval_settings(self) -> SamplerSettings:
        """The held-out evaluation sampler (same shift and CFG as the rollouts)."""
        hp = self.hparams
        return SamplerSettings(hp.eval_sampler, hp.eval_num_steps, hp.shift, hp.guidance_scale, hp.noise_level)

    #: Further rollouts drawn (fresh prompts and noise) when a rollout has no group of unequal rewards.
    max_resamples: int = 3

    def _count_hint(self, world_size: int) -> str:
        return (
            f"lower data.prompts_per_rank (now {self.hparams.prompts_per_rank}"
            f"{f' on each of {world_size} ranks' if world_size > 1 else ''}) or add prompts"
        )

    def setup(self, stage: str) -> None:
        """Checks that need the trainer but no model: the world's vocabulary and the world size."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        hparams = getattr(module, "hparams", {}) or {}
        vocabulary = world_vocabulary(hparams.get("model_path")) if hparams.get("backbone") == "world" else None
        world_size = int(getattr(trainer, "world_size", 1) or 1)
        if stage == "fit":
            validate_prompt_file(
                self.train_file, key="data.train_prompts", vocabulary=vocabulary,
                min_distinct_prompts=self.hparams.prompts_per_rank * world_size, count_hint=self._count_hint(world_size),
            )
        if self.eval_file is not None and stage in ("fit", "validate", "test"):
            validate_prompt_file(self.eval_file, key="data.eval_prompts", vocabulary=vocabulary)

    def state_dict(self) -> dict[str, Any]:
        """Counters that continue across a resume (checkpointed by Lightning)."""
        return {"images_generated": self.images_generated, "rollouts_done": self.rollouts_done, "rollout_seconds": dict(self.rollout_seconds)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images_generated = int(state_dict.get("images_generated", 0))
        self.rollouts_done = int(state_dict.get("rollouts_done", 0))
        self.rollout_seconds.update({k: float(v) for k, v in (state_dict.get("rollout_seconds") or {}).items()})

    def rollout_seed(self, epoch: int, attempt: int = 0) -> int:
        """Seed of epoch ``epoch``'s rollout (``attempt`` > 0: its resampled retries)."""
        if attempt == 0:
            return rollout_seed(int(self.hparams.seed), epoch)
        return resample_seed(int(self.hparams.seed), epoch, attempt)

    def make_rollout(
        self, backbone, *, epoch: int, rank: int = 0, world_size: int = 1, keep_trajectory: bool = False, attempt: int = 0
    ) -> Rollout:
        """The rollout rank ``rank`` trains on in ``epoch`` (no Lightning needed); ``attempt`` > 0:
        the resampled rollout drawn when the earlier ones had no group of unequal rewards."""
        hp = self.hparams
        seed = self.rollout_seed(epoch, attempt)
        draw = draw_prompts(self.records, hp.prompts_per_rank * world_size, seed=seed, balance_tags=hp.balance_tags)
        # Whole groups per rank: group g of the epoch's draw lives on rank g % world_size.
        group_ids = list(range(rank, len(draw), world_size))
        return generate_groups(
            backbone,
            [self.records[draw[g]] for g in group_ids],
            hp.group_size,
            self.reward,
            seed=seed,
            group_ids=group_ids,
            settings=self.rollout_settings,
            advantage_std=hp.advantage_std,
            advantage_clip=hp.advantage_clip,
            keep_trajectory=keep_trajectory,
            batch_size=hp.rollout_batch_size,
            overlap_scoring=hp.overlap_scoring,
            progress=hp.progress and rank == 0,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        module = trainer.lightning_module
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "RolloutDataModule regenerates rollouts with the current policy each epoch: "
                "set trainer.reload_dataloaders_every_n_epochs=1"
            )
        epoch, rank, world_size = trainer.current_epoch, trainer.global_rank, trainer.world_size
        hp = self.hparams
        was_training = module.training
        module.eval()
        # The module decides which weights sample (the official recipe switches to the old policy late).
        rollout_weights = getattr(module, "rollout_weights", None)
        try:
            with rollout_weights() if callable(rollout_weights) else contextlib.nullcontext():
                for attempt in range(self.max_resamples + 1):
                    rollout = self.make_rollout(
                        module.backbone, epoch=epoch, rank=rank, world_size=world_size,
                        keep_trajectory=getattr(module, "needs_trajectory", False), attempt=attempt,
                    )
                    self.rollouts_done += 1
                    self.images_generated += hp.prompts_per_rank * hp.group_size * world_size
                    for phase, seconds in zip(ROLLOUT_PHASES, (rollout.seconds, rollout.sampling_seconds, rollout.scoring_seconds, rollout.reward_wait_seconds)):
                        self.rollout_seconds[phase] += float(seconds)
                    groups = rollout.informative_groups() if hp.skip_zero_std_groups else None
                    batches = rollout.batches(hp.groups_per_batch, groups=groups, seed=self.rollout_seed(epoch, attempt) + rank)
                    # Every rank decides together (the minimum over ranks), so all resample alike.
                    batches = batches[: _min_over_ranks(len(batches))]
                    if batches:
                        break
                    if attempt < self.max_resamples:
                        warnings.warn(
                            f"rollout of epoch {epoch}: all {rollout.num_groups} group(s) had equal rewards (no preference to "
                            f"learn from, data.skip_zero_std_groups=true skips them); drawing a fresh rollout "
                            f"({attempt + 1} of at most {self.max_resamples})",
                            stacklevel=2,
                        )
        finally:
            module.train(was_training)
        self.last_rollout = rollout
        self.last_resamples = attempt
        if not batches:
            raise ConfigError(
                f"no training batches in epoch {epoch}: in {self.max_resamples + 1} rollouts every group had equal rewards "
                f"(rewards {sorted(self.rewards)} gave all data.group_size={hp.group_size} images of each prompt the same "
                "score). Use a larger data.group_size, another reward (data.rewards) with more spread, or "
                "data.skip_zero_std_groups=false (such groups then train with zero advantages)"
            )
        return DataLoader(_Batches(batches, self.hparams.passes_per_rollout), batch_size=None, collate_fn=_collate)


    # ------------------------------------------------------------------ held-out evaluation

    @property
    def eval_rewards(self) -> dict:
        """Evaluation rewards by name, built on first use."""
        if self._eval_rewards is None:
            from dgpo_lightning.rewards.base import build

            self._eval_rewards = {
                name: build(name, **dict(self.reward_options.get(name, {}))) for name in self.eval_reward_names
            }
        return self._eval_rewards

    def eval_tags(self) -> list[str]:
        """GenEval task families present in the held-out prompts (empty for plain-text prompts)."""
        return sorted({str(r["tag"]) for r in self.eval_records if "tag" in r})

    def eval_items(self) -> list[dict[str, Any]]:
        """One item per held-out image: the prompt record and its fixed seed.

        Planned exactly as ``python -m dgpo_lightning.evaluate --seed eval_seed`` plans them
        (:func:`~dgpo_lightning.sampling.seeds.evaluation_plan`), so the two report the same numbers.
        """
        from dgpo_lightning.sampling.seeds import evaluation_plan

        hp = self.hparams
        plan = evaluation_plan(self.eval_records, hp.eval_seed, hp.eval_images_per_prompt, hp.eval_min_images_per_task)
        return [{"record": self.eval_records[index], "seed": image_seed} for index, image_seed in plan]

    def val_dataloader(self) -> DataLoader:
        # A map-style dataset: Lightning shards it across ranks with a DistributedSampler.
        return DataLoader(self.eval_items(), batch_size=self.hparams.eval_batch_size, collate_fn=list)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def _min_over_ranks(value: int) -> int:
    """Smallest ``value`` over ranks (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.long)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())

