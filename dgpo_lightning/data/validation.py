"""One validation path for prompt files, their GenEval metadata and the rewards scored on them.

Training (``RolloutDataModule``, before any model is loaded) and ``python -m dgpo_lightning.evaluate``
call the same functions, so what one refuses the other refuses too. Every error is a
:class:`~dgpo_lightning.errors.ConfigError` (a ``ValueError``) that names the config key, the file,
the line and what is wrong, e.g. ``data.train_prompts: world/prompts/x.jsonl:3: unknown class 'dog'``.

Checked:

* the file itself (exists, valid JSON lines, a non-empty ``prompt`` per record): :func:`read_prompt_file`;
* GenEval rewards (:data:`METADATA_REWARDS`) need GenEval metadata (``include`` clauses) on every record;
* records read by the embedded world's detector must describe scenes the world can draw (known
  classes, colours, relations, counts; ``world.scene.validate_metadata``);
* prompts must be encodable by the world's text encoder when the backbone is the world (every word in
  its vocabulary; an unknown word would silently become ``[unk]``);
* reward weights must be finite numbers;
* a rollout needs ``prompts_per_rank × world_size`` distinct prompts: with fewer, prompts would be
  repeated inside one rollout, which is almost always a configuration mistake (1 prompt with
  ``prompts_per_rank 8``), so it is refused, naming the counts and the keys to change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Collection, Mapping

from dgpo_lightning.data.prompts import PromptFile, read_prompt_file
from dgpo_lightning.errors import ConfigError

#: Rewards scored from each prompt's GenEval clauses: plain-text prompts cannot be scored with them.
METADATA_REWARDS: tuple[str, ...] = ("geneval", "geneval_partial")


def check_reward_weights(weights: Mapping[str, Any], *, key: str = "data.rewards") -> dict[str, float]:
    """``{name: weight}`` as floats; refuses non-numeric and non-finite (NaN, inf) weights."""
    out = {}
    for name, weight in weights.items():
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.{name}={weight!r} must be a number") from None
        if isinstance(weight, bool) or not math.isfinite(value):
            raise ConfigError(f"{key}.{name}={weight!r} must be a finite number")
        out[name] = value
    return out


def _detector_of(name: str, reward_options: Mapping[str, Mapping[str, Any]] | None) -> Any:
    options = (reward_options or {}).get(name) or {}
    return options.get("detector", "world")


def validate_prompt_file(
    spec: str | Path | PromptFile,
    *,
    key: str,
    rewards: Collection[str] = (),
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    vocabulary: Collection[str] | None = None,
    min_distinct_prompts: int = 1,
    count_hint: str = "",
) -> PromptFile:
    """Read ``spec`` and check it for ``rewards``; returns the :class:`PromptFile`.

    Args:
        spec: a path, ``world:<split>``, or an already read :class:`PromptFile`.
        key: the config key or CLI flag that named the file (``data.train_prompts``, ``--prompts``).
        rewards: names of the rewards that will score images of these prompts.
        reward_options: ``{reward: kwargs}``; a GenEval reward's ``detector`` (default ``"world"``)
            decides whose classes are valid: the world's detector only knows the world's.
        vocabulary: words the backbone's text encoder knows (``None``: not checked); see
            :func:`world_vocabulary`.
        min_distinct_prompts: fewest distinct prompts accepted (a rollout's ``prompts_per_rank × world_size``).
        count_hint: what to change when there are too few (appended to that message).

    Raises:
        FileNotFoundError, ConfigError: naming ``key``, the file and the line.
    """
    try:
        prompts = spec if isinstance(spec, PromptFile) else read_prompt_file(spec)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{key}: {error}") from None
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    records = prompts.records

    from dgpo_lightning.rewards.base import reward_kind

    def kind(name: str) -> str:
        return reward_kind(name, (reward_options or {}).get(name))

    for name in rewards:
        if kind(name) not in METADATA_REWARDS:
            continue
        bare = [i for i, r in enumerate(records) if not isinstance(r.get("include"), list)]
        if bare:
            found = "a plain-text file" if prompts.path.suffix != ".jsonl" else f"{len(bare)} of its {len(records)} records have no 'include'"
            raise ConfigError(
                f"{key}: {prompts.where(bare[0])}: reward {name!r} needs GenEval metadata (a .jsonl file with "
                f"'tag' and 'include' per prompt), but this is {found}; use a GenEval prompt file or another reward"
            )
    if any(kind(name) == "ocr" for name in rewards):  # Flow-GRPO's OCR format: the text to render in quotes
        from dgpo_lightning.rewards.ocr import extract_quoted_text

        for index, record in enumerate(records):
            try:
                extract_quoted_text(str(record["prompt"]))
            except ValueError:
                raise ConfigError(
                    f"{key}: {prompts.where(index)}: the OCR reward needs the text to render in double quotes "
                    f"(e.g. 'a sign that says \"OPEN\"'), got {record['prompt']!r}"
                ) from None
    from dgpo_lightning.rewards.geneval_rules import check_metadata

    for index, record in enumerate(records):  # GenEval records are checked whichever reward reads them
        if "include" in record:
            try:
                check_metadata(record)
            except ValueError as error:
                raise ConfigError(f"{key}: {prompts.where(index)}: {error}") from None
    world_detector = any(kind(name) in METADATA_REWARDS and _detector_of(name, reward_options) == "world" for name in rewards)
    if world_detector:
        from dgpo_lightning.world.scene import validate_metadata

        for index, record in enumerate(records):
            try:
                validate_metadata(record, where=prompts.where(index))
            except ValueError as error:
                raise ConfigError(f"{key}: {error}") from None

    if vocabulary is not None:
        from dgpo_lightning.world.model import split_words

        known = set(vocabulary)
        for index, record in enumerate(records):
            words = split_words(record["prompt"])
            unknown = [w for w in words if w not in known]
            if unknown or not words:
                what = f"unknown word(s) {unknown}" if unknown else "no word"
                raise ConfigError(
                    f"{key}: {prompts.where(index)}: prompt {record['prompt']!r} has {what} for the world's text encoder "
                    "(it would be encoded as [unk]); use the world's vocabulary (classes, colours, counts, relations)"
                )

    distinct = len({r["prompt"] for r in records})
    if distinct < min_distinct_prompts:
        raise ConfigError(
            f"{key}: {prompts.path} has {distinct} distinct prompt(s) but a rollout draws {min_distinct_prompts}, "
            f"so prompts would repeat within a rollout{'; ' + count_hint if count_hint else ''}"
        )
    return prompts


def world_vocabulary(model_path: str | Path | None = None) -> list[str]:
    """Words of a world checkpoint's text encoder, read from its ``text_encoder/config.json`` (no
    weights are loaded); ``None``: the shipped base."""
    from dgpo_lightning.world import model as world_model

    if model_path is None:
        from dgpo_lightning.world.backbone import BASE_CHECKPOINT

        model_path = BASE_CHECKPOINT
    config = Path(model_path) / "text_encoder" / "config.json"
    try:
        vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab") if config.is_file() else None
    except (OSError, json.JSONDecodeError):
        vocab = None
    return list(vocab) if vocab else world_model.world_vocabulary()


__all__ = ["METADATA_REWARDS", "check_reward_weights", "validate_prompt_file", "world_vocabulary"]
