"""``RolloutDataModule``: regenerates a rollout with the current policy every epoch and serves whole groups."""

from __future__ import annotations

from typing import Any, Iterator, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from dgpo_lightning.data.prompts import draw_prompts, load_prompt_records
from dgpo_lightning.data.rollout import Rollout, generate_groups
from dgpo_lightning.rewards.base import available as available_rewards
from dgpo_lightning.rewards.base import build_weighted
from dgpo_lightning.sampling.settings import SamplerSettings

SamplerName = Literal["ode_dpm", "ode_euler", "sde"]


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
        skip_zero_std_groups: do not train on groups whose rewards are all equal (zero advantages
            give zero DGPO gradient; skipping them saves the compute). Every rank then trains on the
            same number of batches (the minimum over ranks) so no rank waits in a collective.
        balance_tags: draw prompts evenly across GenEval task families.
        rollout_batch_size: images per sampler call.
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
        skip_zero_std_groups: bool = True,
        balance_tags: bool = True,
        rollout_batch_size: int = 64,
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
        _check(group_size >= 2, "data.group_size", group_size, "must be >= 2 (a group needs a preference)")
        _check(prompts_per_rank >= 1, "data.prompts_per_rank", prompts_per_rank, "must be >= 1")
        _check(groups_per_batch >= 1, "data.groups_per_batch", groups_per_batch, "must be >= 1")
        _check(
            groups_per_batch <= prompts_per_rank,
            "data.groups_per_batch",
            groups_per_batch,
            f"must be <= data.prompts_per_rank={prompts_per_rank} (a batch holds whole groups of one rank)",
        )
        _check(passes_per_rollout >= 1, "data.passes_per_rollout", passes_per_rollout, "must be >= 1")
        _check(num_steps >= 1, "data.num_steps", num_steps, "must be >= 1")
        _check(shift is None or shift > 0, "data.shift", shift, "must be > 0 or null")
        _check(noise_level >= 0, "data.noise_level", noise_level, "must be >= 0")
        _check(bool(rewards), "data.rewards", rewards, "needs at least one reward")
        unknown = sorted(set(rewards) - set(available_rewards()))
        _check(not unknown, "data.rewards", unknown, f"names unknown rewards; available: {available_rewards()}")
        eval_rewards = ["geneval"] if eval_rewards is None else list(eval_rewards)
        unknown = sorted(set(eval_rewards) - set(available_rewards()))
        _check(not unknown, "data.eval_rewards", unknown, f"names unknown rewards; available: {available_rewards()}")
        _check(eval_images_per_prompt >= 1, "data.eval_images_per_prompt", eval_images_per_prompt, "must be >= 1")
        _check(eval_min_images_per_task >= 0, "data.eval_min_images_per_task", eval_min_images_per_task, "must be >= 0")
        self.save_hyperparameters()
        self.records = load_prompt_records(train_prompts)  # fails now, naming the file
        self.eval_records = load_prompt_records(eval_prompts) if eval_prompts else []
        self.eval_reward_names = eval_rewards
        self._eval_rewards = None
        self.images_generated = 0
        self.rewards = rewards
        self.reward_options = dict(reward_options or {})
        self._reward = None
        self.last_rollout: Rollout | None = None
        self.rollouts_done = 0

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

    def rollout_seed(self, epoch: int) -> int:
        return int(self.hparams.seed) * 1_000_003 + epoch

    def make_rollout(self, backbone, *, epoch: int, rank: int = 0, world_size: int = 1, keep_trajectory: bool = False) -> Rollout:
        """The rollout rank ``rank`` trains on in ``epoch`` (no Lightning needed)."""
        hp = self.hparams
        draw = draw_prompts(
            self.records, hp.prompts_per_rank * world_size, seed=self.rollout_seed(epoch), balance_tags=hp.balance_tags
        )
        # Whole groups per rank: group g of the epoch's draw lives on rank g % world_size.
        group_ids = list(range(rank, len(draw), world_size))
        return generate_groups(
            backbone,
            [self.records[draw[g]] for g in group_ids],
            hp.group_size,
            self.reward,
            seed=self.rollout_seed(epoch),
            group_ids=group_ids,
            settings=self.rollout_settings,
            advantage_std=hp.advantage_std,
            keep_trajectory=keep_trajectory,
            batch_size=hp.rollout_batch_size,
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
        was_training = module.training
        module.eval()
        rollout = self.make_rollout(
            module.backbone,
            epoch=trainer.current_epoch,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            keep_trajectory=getattr(module, "needs_trajectory", False),
        )
        module.train(was_training)
        self.last_rollout = rollout
        self.rollouts_done += 1
        self.images_generated += self.hparams.prompts_per_rank * self.hparams.group_size * trainer.world_size
        groups = rollout.informative_groups() if self.hparams.skip_zero_std_groups else None
        batches = rollout.batches(self.hparams.groups_per_batch, groups=groups, seed=self.rollout_seed(trainer.current_epoch) + trainer.global_rank)
        batches = batches[: _min_over_ranks(len(batches))]
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


def _check(ok: bool, key: str, value: Any, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {message}")
