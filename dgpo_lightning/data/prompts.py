"""Prompt datasets: GenEval-format jsonl (prompt + metadata) or plain text, and per-epoch prompt draws.

``"world:train"`` / ``"world:validation"`` / ``"world:test"`` name the embedded world's shipped splits, ``"world_video:train"`` /
``"world_video:validation"`` / ``"world_video:test"`` the video world's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

WORLD_PREFIX = "world:"
WORLD_VIDEO_PREFIX = "world_video:"


def resolve_prompt_path(spec: str | Path) -> Path:
    """Path of a prompt file; ``world:<split>`` / ``world_video:<split>`` resolve to the embedded
    (video) world's shipped split."""
    text = str(spec)
    if text.startswith(WORLD_VIDEO_PREFIX):
        from dgpo_lightning.world.video.scene import prompt_file as video_prompt_file

        return video_prompt_file(text[len(WORLD_VIDEO_PREFIX) :])
    if text.startswith(WORLD_PREFIX):
        from dgpo_lightning.world.scene import prompt_file

        return prompt_file(text[len(WORLD_PREFIX) :])
    return Path(text)


@dataclass(frozen=True)
class PromptFile:
    """A prompt file as read: its resolved ``path``, the ``records`` and each record's 1-based ``lines``."""

    path: Path
    records: list[dict[str, Any]]
    lines: list[int]

    def where(self, index: int) -> str:
        """``path:line`` of record ``index`` (for error messages)."""
        return f"{self.path}:{self.lines[index]}"

    @property
    def has_metadata(self) -> bool:
        """Whether every record carries GenEval clauses (``include``)."""
        return all(isinstance(r.get("include"), list) for r in self.records)


def read_prompt_file(spec: str | Path) -> PromptFile:
    """Read a prompt file: the one reader of the project (training, evaluation, the world).

    ``.jsonl``: one JSON object per line (GenEval schema: ``prompt``, ``tag``, ``include``, ``exclude``);
    anything else: one prompt per line (records ``{"prompt": line}``, no metadata). Blank lines are
    skipped. Only the format is checked here; :mod:`dgpo_lightning.data.validation` checks content.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ConfigError: the file holds no prompts, a line is not valid JSON, or a record lacks a
            non-empty string ``prompt`` (the message names file and line).
    """
    from dgpo_lightning.errors import ConfigError

    path = resolve_prompt_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {error.object[error.start]:#x}); save the prompt file as UTF-8") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ConfigError(f"{path}:{number}: each record needs a non-empty string 'prompt'")
        else:
            record = {"prompt": line.strip()}
        records.append(record)
        lines.append(number)
    if not records:
        raise ConfigError(f"prompt file {path} contains no prompts")
    return PromptFile(path, records, lines)


def load_prompt_records(spec: str | Path) -> list[dict[str, Any]]:
    """The records of :func:`read_prompt_file` (each with at least a ``"prompt"`` key)."""
    return read_prompt_file(spec).records


def draw_prompts(
    records: Sequence[dict[str, Any]], count: int, *, seed: int, balance_tags: bool = True
) -> list[int]:
    """Indices of ``count`` prompts for one rollout, reproducible from ``seed``.

    With ``balance_tags`` the draw cycles over the tag families (GenEval ``tag``; records without one
    form their own family), so a rollout of 8 prompts over 6 families sees every family instead of
    mostly the largest one (the shipped training split is 50% colour attribution). Within a family,
    prompts are drawn without replacement until the family is exhausted.
    """
    if count < 1:
        raise ValueError(f"need at least one prompt per rollout, got {count}")
    generator = torch.Generator().manual_seed(int(seed))
    if not balance_tags:
        order = torch.randperm(len(records), generator=generator).tolist()
        return [order[i % len(order)] for i in range(count)]
    families: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        families.setdefault(str(record.get("tag", "")), []).append(index)
    names = sorted(families)
    names = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
    queues = {name: [] for name in names}
    chosen = []
    while len(chosen) < count:
        for name in names:
            if len(chosen) == count:
                break
            if not queues[name]:
                members = families[name]
                queues[name] = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            chosen.append(queues[name].pop())
    return chosen
