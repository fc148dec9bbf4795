"""A benchmark protocol (the paper's evaluation table) for a base model and trained adapters.

``python -m dgpo_lightning.evaluate --protocol paper --backbone sd3 --model DIR --adapter NAME=DIR ... --out OUT``
(or ``python -m dgpo_lightning.benchmark``). A protocol (YAML, e.g. ``experiments/protocols/paper.yaml``)
has *sections*: a prompt file, images per prompt and *columns*, each a reward with its options. The
images of a section are sampled once per model and scored by all its columns (the out-of-domain
suite scores one set of images with five rewards). Rows are models: the base, then each adapter.

Written under ``OUT``: ``table.md`` and ``table.csv`` (rows: models; columns in the protocol's order,
in-domain then out-of-domain, as the paper lays them out), ``results.json`` (every cell's summary,
the settings, what was skipped and why), ``grids/<row>__<section>.png`` (a few images per task with
their scores), and ``cells/<row>/<section>.jsonl`` (one line per scored image).

Resume: a rerun with the same ``OUT`` reads the ``cells`` files and samples only the images not yet
scored (each image is seeded by ``(seed, prompt index, image index)``, so the numbers do not depend
on where a run stopped). A run with other settings in the same ``OUT`` is refused.

Missing inputs skip a column, not the run: a prompt file that does not exist, or weights or a judge
server that a reward cannot load, print ``skipped <column>: <reason>`` with what to provide, and the
column is blank in the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from dgpo_lightning.errors import ShortErrorsParser, UsageError, json_object_option, read_yaml_option
from dgpo_lightning.evaluation import TaskExamples, generate_images, save_grid, score_images, summarize_scores, task_of
from dgpo_lightning.sampling.seeds import evaluation_plan
from dgpo_lightning.sampling.settings import SamplerSettings

#: ``--protocol paper`` resolves to this file of the repository.
PAPER_PROTOCOL = Path(__file__).resolve().parents[1] / "experiments" / "protocols" / "paper.yaml"
BASE_ROW = "base"
#: Errors that mean "this column's inputs are not there" (missing weights, a judge server down), not a bug.
MISSING_INPUT_ERRORS = (FileNotFoundError, OSError, ImportError, RuntimeError)


@dataclass
class Column:
    name: str
    reward: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    name: str
    prompts: str
    columns: list[Column]
    images_per_prompt: int = 1
    min_images_per_task: int = 0
    group: str = "in-domain"


@dataclass
class Protocol:
    sections: list[Section]
    sampling: SamplerSettings
    seed: int = 0
    source: str = ""

    def columns(self) -> list[tuple[Section, Column]]:
        """Every column in table order: in-domain sections first, then the others, each in file order."""
        groups = list(dict.fromkeys(["in-domain", *(s.group for s in self.sections)]))
        return [(s, c) for g in groups for s in self.sections if s.group == g for c in s.columns]


def read_protocol(path: str | Path) -> Protocol:
    """Parse a protocol YAML; errors name the file and the key."""
    path = Path(path)
    raw = read_yaml_option(str(path), "--protocol")
    where = f"--protocol {path}"
    if not isinstance(raw, dict) or not isinstance(raw.get("sections"), dict) or not raw["sections"]:
        raise UsageError(f"{where}: needs a 'sections' mapping (name -> prompts, images_per_prompt, columns)")
    sampling = raw.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise UsageError(f"{where}: 'sampling' must be a mapping of sampler settings")
    try:
        settings = SamplerSettings(**sampling)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{where}: sampling: {error}") from None
    sections = []
    for name, spec in raw["sections"].items():
        key = f"{where}: sections.{name}"
        if not isinstance(spec, dict) or not isinstance(spec.get("prompts"), str):
            raise UsageError(f"{key} needs 'prompts' (a prompt file path)")
        columns = spec.get("columns")
        if not isinstance(columns, dict) or not columns:
            raise UsageError(f"{key} needs 'columns' (column name -> {{reward, options}})")
        parsed = []
        for column, entry in columns.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("reward"), str):
                raise UsageError(f"{key}.columns.{column} needs 'reward' (a reward name)")
            options = entry.get("options") or {}
            if not isinstance(options, dict):
                raise UsageError(f"{key}.columns.{column}.options must be a mapping")
            parsed.append(Column(str(column), entry["reward"], dict(options)))
        images = spec.get("images_per_prompt", 1)
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise UsageError(f"{key}.images_per_prompt must be an integer >= 1, got {images!r}")
        sections.append(
            Section(
                str(name), spec["prompts"], parsed, images, int(spec.get("min_images_per_task", 0)), str(spec.get("group", "in-domain"))
            )
        )
    labels = [(s.group, c.name) for s in sections for c in s.columns]
    if len(set(labels)) != len(labels):
        raise UsageError(f"{where}: two columns of one group share a name")
    return Protocol(sections, settings, int(raw.get("seed", 0)), str(path))


@dataclass
class Model:
    """One row: the base model, optionally with a LoRA adapter."""

    name: str
    backbone: str
    path: str | None
    options: dict[str, Any]
    adapter: str | None = None
    device: str | None = None

    def load(self):
        from dgpo_lightning.models.factory import load_backbone

        try:
            backbone = load_backbone(self.backbone, self.path, **self.options)
            if self.device:
                backbone = backbone.to(self.device)
            if self.adapter:
                from dgpo_lightning.models.lora import load_adapter

                load_adapter(backbone, self.adapter)
        except (ValueError, FileNotFoundError, OSError, TypeError) as error:
            raise UsageError(f"row {self.name!r}: {error}") from error
        return backbone.eval()


def _fingerprint(protocol: Protocol, section: Section, model: Model) -> dict[str, Any]:
    """What a cell's numbers depend on; a resumed cell must match it."""
    s = protocol.sampling
    return {
        "prompts": section.prompts,
        "images_per_prompt": section.images_per_prompt,
        "min_images_per_task": section.min_images_per_task,
        "seed": protocol.seed,
        "sampling": {"sampler": s.sampler, "num_steps": s.num_steps, "shift": s.shift, "guidance_scale": s.guidance_scale, "noise_level": s.noise_level},
        "backbone": model.backbone,
        "model": model.path,
        "backbone_options": model.options,
        "adapter": model.adapter,
    }


class Cell:
    """The scored images of one (row, section): a JSONL file, appended batch by batch."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = path
        self.meta = path.with_suffix(".meta.json")
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}
        if self.meta.is_file():
            saved = json.loads(self.meta.read_text(encoding="utf-8"))
            if saved != json.loads(json.dumps(fingerprint)):
                differs = sorted(k for k in fingerprint if saved.get(k) != json.loads(json.dumps(fingerprint[k])))
                raise UsageError(
                    f"{path} was scored with other settings ({', '.join(differs)} differ); use another --out or delete it"
                )
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows.setdefault((row["record"], row["seed"]), {}).update(row)
        self._fingerprint = fingerprint

    def missing(self, plan: Sequence[tuple[int, int]], columns: Sequence[str]) -> list[int]:
        """Positions in ``plan`` whose image lacks a score of any of ``columns``."""
        return [i for i, key in enumerate(plan) if not all(c in self.rows.get(key, {}) for c in columns)]

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.meta.is_file():
            self.meta.write_text(json.dumps(self._fingerprint, indent=2) + "\n", encoding="utf-8")
        with self.path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
                self.rows.setdefault((row["record"], row["seed"]), {}).update(row)
            handle.flush()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(
    protocol: Protocol,
    models: Sequence[Model],
    out: str | Path,
    *,
    batch_size: int = 32,
    grid_per_task: int = 4,
    progress: bool = True,
    build_reward: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Evaluate every model on every section; write the table; return ``results.json``'s content."""
    from dgpo_lightning.data.prompts import read_prompt_file

    if build_reward is None:
        from dgpo_lightning.rewards.base import build as build_reward

    out = Path(out)
    table: dict[str, dict[str, float]] = {m.name: {} for m in models}
    skipped: dict[str, str] = {}
    details: dict[str, dict[str, Any]] = {m.name: {} for m in models}
    records_of: dict[str, list[dict[str, Any]] | None] = {}
    for section in protocol.sections:
        try:
            records_of[section.name] = read_prompt_file(section.prompts).records
        except FileNotFoundError:
            records_of[section.name] = None
            for column in section.columns:
                skipped[_label(section, column)] = (
                    f"prompt file {section.prompts} does not exist: provide sections.{section.name}.prompts "
                    f"in {protocol.source or 'the protocol'} or --prompts {section.name}=FILE"
                )
        except ValueError as error:
            raise UsageError(f"sections.{section.name}.prompts: {error}") from error
    rewards: dict[str, Any] = {}
    for section, column in protocol.columns():
        label = _label(section, column)
        if label in skipped:
            continue
        try:
            rewards[label] = build_reward(column.reward, **column.options)
        except (ValueError, TypeError) as error:
            raise UsageError(f"sections.{section.name}.columns.{column.name}: {error}") from error
        except MISSING_INPUT_ERRORS as error:
            skipped[label] = f"{type(error).__name__}: {error}"
            continue
        # Rewards load weights (or reach their server) on first use: try each once on a grey image
        # now, so a missing input skips its column before any image is sampled for it.
        probe = records_of[section.name][0]
        try:
            score_images({column.name: rewards[label]}, torch.full((1, 3, 64, 64), 0.5), [str(probe["prompt"])], [probe])
        except MISSING_INPUT_ERRORS as error:
            skipped[label] = f"{type(error).__name__}: {error}"
    for label, reason in skipped.items():
        _say(f"skipped {label}: {reason}")
    for model in models:
        backbone = None
        for section in protocol.sections:
            records = records_of[section.name]
            live = [c for c in section.columns if _label(section, c) not in skipped]
            if records is None or not live:
                continue
            plan = evaluation_plan(records, protocol.seed, section.images_per_prompt, section.min_images_per_task)
            keys = [(index, image_seed) for index, image_seed in plan]
            cell = Cell(out / "cells" / model.name / f"{section.name}.jsonl", _fingerprint(protocol, section, model))
            todo = cell.missing(keys, [c.name for c in live])
            examples = TaskExamples(grid_per_task)
            if todo:
                if backbone is None:
                    _say(f"[{model.name}] loading {model.backbone} {model.path or ''}" + (f" + {model.adapter}" if model.adapter else ""))
                    backbone = model.load()
                settings = protocol.sampling
                starts = range(0, len(todo), batch_size)
                if progress:
                    from tqdm.auto import tqdm

                    starts = tqdm(starts, desc=f"{model.name}/{section.name}", unit="batch", leave=False)
                for start in starts:
                    chosen = todo[start : start + batch_size]
                    recs = [records[plan[i][0]] for i in chosen]
                    prompts = [str(r["prompt"]) for r in recs]
                    images = generate_images(backbone, prompts, [plan[i][1] for i in chosen], settings, batch_size=batch_size)
                    scores = {}
                    for column in list(live):
                        label = _label(section, column)
                        try:
                            scores[column.name] = score_images({column.name: rewards[label]}, images, prompts, recs)[column.name]
                        except MISSING_INPUT_ERRORS as error:  # weights or a server a reward loads on first use
                            skipped[label] = f"{type(error).__name__}: {error}"
                            _say(f"skipped {label}: {skipped[label]}")
                            live.remove(column)
                    if not scores:
                        break
                    cell.append([
                        {"record": plan[i][0], "seed": plan[i][1], "prompt": prompts[k], "tag": task_of(recs[k]),
                         **{name: float(values[k]) for name, values in scores.items()}}
                        for k, i in enumerate(chosen)
                    ])
                    examples.add(images, prompts, [task_of(r) for r in recs], scores)
            tags = [task_of(records[index]) for index, _ in plan]
            for column in live:
                values = [cell.rows.get(key, {}).get(column.name) for key in keys]
                if any(v is None for v in values):
                    continue
                summary = summarize_scores(values, tags)
                table[model.name][_label(section, column)] = summary["overall"]
                details[model.name][_label(section, column)] = {**summary, "images": len(values)}
            grid = examples.result()
            if grid is not None and live:
                save_grid(grid, out / "grids" / f"{model.name}__{section.name}.png", per_task=grid_per_task, reward=live[0].name)
    columns = [_label(s, c) for s, c in protocol.columns()]
    results = {
        "protocol": protocol.source,
        "columns": columns,
        "groups": {_label(s, c): s.group for s, c in protocol.columns()},
        "rows": {m.name: {"backbone": m.backbone, "model": m.path, "adapter": m.adapter} for m in models},
        "table": table,
        "details": details,
        "skipped": skipped,
        "seed": protocol.seed,
        "sampling": _fingerprint(protocol, protocol.sections[0], models[0])["sampling"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "table.md").write_text(format_markdown(results), encoding="utf-8")
    write_csv(results, out / "table.csv")
    return results


def _label(section: Section, column: Column) -> str:
    return f"{section.name}/{column.name}"


def _header(results: Mapping[str, Any]) -> list[str]:
    return [label.split("/", 1)[1] for label in results["columns"]]


def format_markdown(results: Mapping[str, Any]) -> str:
    """The table in the paper's layout (a ``‖`` column between in-domain and other groups), with
    the skipped columns' reasons below it."""
    columns, groups = results["columns"], results["groups"]
    header, cells = ["model"], [[name] for name in results["table"]]
    previous = None
    for label, title in zip(columns, _header(results)):
        if previous is not None and groups[label] != previous:
            header.append("‖")
            for row in cells:
                row.append("‖")
        previous = groups[label]
        header.append(title)
        for row, name in zip(cells, results["table"]):
            value = results["table"][name].get(label)
            row.append("—" if value is None or not math.isfinite(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    groups_line = " · ".join(f"{g}: {', '.join(t for l, t in zip(columns, _header(results)) if groups[l] == g)}" for g in dict.fromkeys(groups.values()))
    lines += ["", groups_line]
    for label, reason in results["skipped"].items():
        lines.append(f"- {label} skipped: {reason}")
    return "\n".join(lines) + "\n"


def write_csv(results: Mapping[str, Any], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", *results["columns"]])
        for name, row in results["table"].items():
            writer.writerow([name, *("" if row.get(c) is None else f"{row[c]:.6f}" for c in results["columns"])])


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise UsageError(f"{flag} {value!r}: expected NAME=PATH")
        if name in pairs:
            raise UsageError(f"{flag}: {name!r} given twice")
        pairs[name] = target
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = ShortErrorsParser(
        prog="python -m dgpo_lightning.evaluate --protocol",
        description="Evaluate a base model and trained adapters with a benchmark protocol (the paper's table).",
        allow_abbrev=False,
    )
    parser.add_argument("--protocol", required=True, help="'paper' (experiments/protocols/paper.yaml) or a protocol YAML file")
    parser.add_argument("--backbone", default="world", help="backbone kind (world, sd3, flux, ...)")
    parser.add_argument("--model", default=None, help="base pipeline / checkpoint directory")
    parser.add_argument("--backbone-options", default=None, help="JSON object of backbone options")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a trained LoRA adapter (one row each; repeatable)")
    parser.add_argument("--no-base", action="store_true", help="leave out the base model's row")
    parser.add_argument("--prompts", action="append", default=[], metavar="SECTION=FILE", help="override a section's prompt file")
    parser.add_argument(
        "--reward-options", default=None,
        help="JSON object or .json/.yaml file {reward: {option: value}} merged into every column of that reward",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grid-per-task", type=int, default=4)
    parser.add_argument("--out", required=True, help="output directory (table.md, table.csv, results.json, grids/, cells/)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = PAPER_PROTOCOL if args.protocol == "paper" else Path(args.protocol)
        if not path.is_file():
            raise UsageError(f"--protocol {args.protocol}: {path} does not exist")
        protocol = read_protocol(path)
        for name, file in _pairs(args.prompts, "--prompts").items():
            matches = [s for s in protocol.sections if s.name == name]
            if not matches:
                raise UsageError(f"--prompts {name}=...: the protocol has no section {name!r} ({', '.join(s.name for s in protocol.sections)})")
            matches[0].prompts = file
        if args.reward_options:
            text = args.reward_options
            extra = read_yaml_option(text, "--reward-options") if text.endswith((".yaml", ".yml")) else json_object_option(text, "--reward-options")
            for section in protocol.sections:
                for column in section.columns:
                    column.options.update((extra or {}).get(column.reward) or {})
        if args.backbone != "world" and not args.model:
            raise UsageError(f"--backbone {args.backbone} needs --model PATH")
        options = json_object_option(args.backbone_options, "--backbone-options")
        models = [] if args.no_base else [Model(BASE_ROW, args.backbone, args.model, options, device=args.device)]
        for name, adapter in _pairs(args.adapter, "--adapter").items():
            if name == BASE_ROW and not args.no_base:
                raise UsageError(f"--adapter {name}=...: '{BASE_ROW}' names the base model's row")
            models.append(Model(name, args.backbone, args.model, options, adapter, args.device))
        if not models:
            raise UsageError("nothing to evaluate: --no-base without any --adapter")
        results = run_benchmark(
            protocol, models, args.out, batch_size=args.batch_size, grid_per_task=args.grid_per_task, progress=not args.no_progress
        )
    except UsageError as error:
        parser.exit(2, "error: " + " ".join(str(error).split()) + "\n")
    print(format_markdown(results), end="")
    print(f"written to {Path(args.out) / 'table.md'}, table.csv, results.json and grids/")
    return results


if __name__ == "__main__":
    main()


__all__ = ["Column", "Model", "PAPER_PROTOCOL", "Protocol", "Section", "format_markdown", "main", "read_protocol", "run_benchmark"]
