"""``python -m dgpo_lightning fit|validate|test --config A.yaml --config B.yaml``.

Configs compose left to right (later files override earlier ones). ``trainer.default_root_dir`` is
the run directory, the one place that decides where a run is written::

    <run>/config.yaml                  resolved config of the fit (what a resume is checked against)
    <run>/tb/                          TensorBoard logs (the logger's save_dir is always <run>), samples/
    <run>/tb/checkpoints/last.ckpt     written every epoch
    <run>/final/                       the trained model (ExportTrained)
    <run>/eval_history.csv, score_vs_time.png   held-out scores during fit (ScoreHistory)

``fit --resume auto|fresh|force`` (default ``auto``): see :meth:`DGPOCLI.check_run_directory`.
``validate``/``test`` evaluate the run's last checkpoint when there is one (``--ckpt_path base``: the
base model) and say which weights they evaluate.

User errors (unknown or abbreviated keys, bad values, missing files: :class:`ConfigError`, and
``ValueError``/``FileNotFoundError`` raised while the config is turned into objects) end in a short
message and exit code 2; ``DGPO_DEBUG=1`` or ``--debug`` shows the traceback and jsonargparse's usage.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from dgpo_lightning.callbacks.export import fit_problem
from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.errors import ConfigError
from dgpo_lightning.module import DGPOModule

PROG = "python -m dgpo_lightning"
DEBUG_HINT = "DGPO_DEBUG=1 shows the traceback"

TRAINER_DEFAULTS = {
    # Rollouts are regenerated with the current policy at the start of every epoch.
    "reload_dataloaders_every_n_epochs": 1,
    # no_grad rather than inference_mode for evaluation: tensors made while evaluating (metric
    # states, prompt caches) are reused by training afterwards.
    "inference_mode": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "default_root_dir": "runs",
}

#: Keys that may differ between a run's saved config and the fit that resumes it: budgets, display,
#: and where the run is (fnmatch patterns over the dotted keys of :func:`flatten`).
RESUMABLE_CHANGES = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "trainer.logger.init_args.save_dir",
    "trainer.callbacks[ScoreHistory].init_args.max_training_minutes",
    "data.progress",
    "ckpt_path",
    "resume",
)
#: The saved config of a run, relative to the run directory (``tb/config.yaml``: runs made before
#: ``config.yaml`` moved to the run directory).
CONFIG_FILES = ("config.yaml", "tb/config.yaml")


def debugging() -> bool:
    return os.environ.get("DGPO_DEBUG", "") not in ("", "0")


class RunConflict(ConfigError):
    """The run directory holds a run with another configuration (the message says what to do)."""


class FitIncomplete(ConfigError):
    """``fit`` ended before its stopping condition (e.g. no training batches): not a success."""


class DGPOArgumentParser(LightningArgumentParser):
    """Parse errors print the error and a one-line hint instead of the whole usage."""

    def error(self, message: str, ex: Exception | None = None):
        if debugging() or not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        self._logger.error(message)
        sys.stderr.write(f"error: {shorten(message)}\n{hint_for(message, parser.prog.replace(' [options]', ''))}\n")
        sys.exit(2)


class SaveRunConfig(SaveConfigCallback):
    """Write the fit's resolved config to ``<run>/config.yaml`` atomically; validate/test leave it alone
    (it is the record a resume is checked against)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.already_saved:
            return
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            with warnings.catch_warnings():  # skip_none is deprecated but Lightning's own loader expects it
                warnings.simplefilter("ignore")
                self.parser.save(self.config, partial, skip_none=False, overwrite=True, multifile=self.multifile)
            os.replace(partial, path)
        self.already_saved = True


class DGPOCLI(LightningCLI):
    """LightningCLI over :class:`DGPOModule` and :class:`RolloutDataModule` (see the module docstring).

    The module builds its own optimizer (``model.optimizer``), so LightningCLI's ``--optimizer`` and
    ``--lr_scheduler`` options are off.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False, "allow_abbrev": False, "prog": PROG})
        kwargs.setdefault("auto_configure_optimizers", False)
        self._resume_last = False
        super().__init__(DGPOModule, RolloutDataModule, *args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        self.parser_class = DGPOArgumentParser
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--resume",
            type=Literal["auto", "fresh", "force"],
            default="auto",
            help="fit only. auto: continue the run in trainer.default_root_dir if its config.yaml matches, "
            "refuse if it differs; fresh: move that run aside to <dir>.old-<time> and start over; "
            "force: continue it despite differences",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)):
            for path in _config_paths(list(argv)):
                check_config_file(path)
        super().parse_arguments(parser, args)

    def _sub_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._sub_config()
        root = Path(config.trainer.default_root_dir)
        for logger in _loggers(config.trainer.get("logger")):
            if "save_dir" in (logger.get("init_args") or {}):
                logger.init_args.save_dir = str(root)
        if self.subcommand == "fit":
            self.check_run_directory(config, root)
        elif self.subcommand and config.get("resume", "auto") != "auto":
            raise ConfigError(f"--resume={config.resume} applies to fit only; {self.subcommand} takes --ckpt_path (a path, or base)")

    def check_run_directory(self, config, root: Path) -> None:
        """Decide between starting and resuming the run in ``root`` before any model is loaded.

        A run exists when ``root`` holds a saved config or a checkpoint. ``auto`` resumes it from its
        ``last.ckpt`` only if the saved config equals the new one up to :data:`RESUMABLE_CHANGES`
        (step/epoch/time budgets, progress display, paths), and otherwise refuses, naming the keys
        that differ, without writing anything. ``fresh`` renames the old run to ``<root>.old-<time>``
        (nothing is deleted); ``force`` resumes despite differences and keeps the old config as
        ``config.old-<time>.yaml``.
        """
        saved = next((root / name for name in CONFIG_FILES if (root / name).is_file()), None)
        checkpoints = sorted(root.glob("**/*.ckpt")) if root.is_dir() else []
        if saved is None and not checkpoints:
            return
        mode, stamp = config.resume, time.strftime("%Y%m%d-%H%M%S")
        if mode == "fresh":
            if rank_zero_only.rank == 0:
                aside = root.with_name(f"{root.name}.old-{stamp}")
                root.rename(aside)
                print(f"fit: moved the previous run in {root} to {aside}; starting a new run", file=sys.stderr)
            return
        if saved is None:
            differences = {"config.yaml": ("(missing)", "(this fit)")}
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = yaml.safe_load(self._parser("fit").dump(config, skip_none=False))
            old = yaml.safe_load(saved.read_text()) or {}
            differences = config_differences(old, new)
        blocking = {k: v for k, v in differences.items() if not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE_CHANGES)}
        if blocking and mode == "auto":
            raise RunConflict(
                f"{root} holds a run whose configuration differs from this fit ({saved or 'no config.yaml'}):\n"
                + format_differences(blocking)
                + f"\nresume it anyway with --resume force, start over with --resume fresh (moves it to {root.name}.old-<time>), "
                "or choose another --trainer.default_root_dir"
            )
        if rank_zero_only.rank == 0:
            if blocking and saved is not None and saved.parent == root:
                shutil.copy2(saved, root / f"config.old-{stamp}.yaml")
            changed = f"; changed: {', '.join(f'{k} {_show(a)} → {_show(b)}' for k, (a, b) in differences.items())}" if differences else ""
            print(f"fit: resuming the run in {root}{changed}", file=sys.stderr)
        self._resume_last = True

    def before_fit(self) -> None:
        if self._resume_last and self.config_init["fit"].get("ckpt_path") is None:
            self.config_init["fit"]["ckpt_path"] = "last"

    def after_fit(self) -> None:
        problem = fit_problem(self.trainer)
        if problem:
            raise FitIncomplete(f"fit did not finish: {problem}; {self.trainer.default_root_dir}/final was not written")

    def before_validate(self) -> None:
        self._choose_weights("validate")

    def before_test(self) -> None:
        self._choose_weights("test")

    def _choose_weights(self, subcommand: str) -> None:
        """``ckpt_path`` unset: the run's last checkpoint if there is one, else the base model; ``base``: the base."""
        init = self.config_init[subcommand]
        path, root = init.get("ckpt_path"), self.trainer.default_root_dir
        base = f"the base model ({self.config[subcommand].model.get('model_path') or 'the backbone default'})"
        if path is None:
            last = [p for cb in self.trainer.checkpoint_callbacks for p in cb._find_last_checkpoints(self.trainer)]
            path = max(last, key=os.path.getmtime) if last else None
            if path is None:
                base = f"{base}: no checkpoint in {root}"
        elif str(path) == "base":
            path = None
        elif str(path) not in ("last", "best", "hpc") and not Path(path).is_file():
            raise ConfigError(f"ckpt_path={path}: no such checkpoint file (use base to {subcommand} the base model)")
        init["ckpt_path"] = path
        if self.trainer.is_global_zero:
            print(f"{subcommand}: evaluating {base if path is None else describe_checkpoint(path)}", file=sys.stderr)


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_file(path: str) -> None:
    """A config file that exists must be a YAML mapping; jsonargparse's own message names neither the
    file nor, for a list, the problem. (A missing file is reported by jsonargparse, naming it.)"""
    file = Path(path)
    if not file.is_file():
        return
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{file}{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(f"{file}: a config file holds a mapping of keys (trainer:, model:, data: ...), got a {type(content).__name__}")


def describe_checkpoint(path) -> str:
    if not Path(path).is_file():
        return f"the run's {path} checkpoint"
    import torch

    step = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("global_step")
    return f"{path} (step {step})"


def _loggers(value) -> list:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if hasattr(v, "get") and v.get("class_path")]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a dumped config; list entries with a ``class_path`` (callbacks) are keyed by class
    name, ``trainer.callbacks[ScoreHistory].init_args.metric``, so that their order does not matter."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) and "class_path" in v for v in value):
        names = [str(v["class_path"]).rsplit(".", 1)[-1] for v in value]
        out: dict[str, Any] = {}
        for i, (name, item) in enumerate(zip(names, value)):
            label = name if names.count(name) == 1 else f"{name}#{names[: i + 1].count(name)}"
            out.update(flatten(item, f"{prefix}[{label}]"))
        return out
    return {prefix: value}


_MISSING = "(unset)"


def config_differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every key whose value differs."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys()) if a.get(k, _MISSING) != b.get(k, _MISSING)}


def _show(value: Any) -> str:
    return value if value == _MISSING else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def format_differences(differences: dict[str, tuple[Any, Any]], limit: int = 12) -> str:
    lines = [f"  {key}: {_show(a)} → {_show(b)}" for key, (a, b) in list(differences.items())[:limit]]
    if len(differences) > limit:
        lines.append(f"  … and {len(differences) - limit} more")
    return "\n".join(lines)


def shorten(message: str, max_lines: int = 4) -> str:
    """The first lines of a (jsonargparse) error message; the full one is shown with DGPO_DEBUG=1."""
    lines = [line.rstrip() for line in str(message).strip().splitlines() if line.strip()]
    if any("Does not validate against any of the Union subtypes" in line for line in lines):
        return _condense_union(lines)
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"  … ({DEBUG_HINT} and the full message)"]
    return "\n".join(lines)


def _condense_union(lines: list[str]) -> str:
    """jsonargparse's "does not validate against any of the Union subtypes": the key, what the
    accepted types said (deduplicated, not the None alternative; at most two) and the given value."""
    items: list[str] = []
    given = None
    i = 1
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("- "):
            text = line[2:]
            if text.endswith(":") and i + 1 < len(lines) and not lines[i + 1].strip().startswith("- "):
                i += 1
                text = f"{text} {lines[i].strip()}"
            if "NoneType" not in text and not text.startswith("Does not validate") and text not in items:
                items.append(text)
        elif line.startswith("Given value:"):
            given = line
        i += 1
    if any("class_path" in t for t in items):  # an import problem says more than "expected a bool"
        items = [t for t in items if not t.startswith("Expected a")] or items
    shown = [f"  - {t[:160]}" for t in items[:2]]
    if len(items) > 2:
        shown[-1] += f" (+{len(items) - 2} more)"
    return "\n".join([lines[0], *shown, *([f"  {given[:160]}"] if given else [])])


def hint_for(message: str, prog: str = PROG) -> str:
    if "--optimizer" in message or "--lr_scheduler" in message:
        return "hint: the optimizer is part of the model: set model.optimizer (in YAML or --model.optimizer ...)"
    return f"hint: see `{prog} --help` for the accepted options; {DEBUG_HINT}"


def is_user_error(error: BaseException) -> bool:
    """Errors caused by the input, printed without a traceback; everything else is a bug."""
    if isinstance(error, (ConfigError, MisconfigurationException, FileNotFoundError)):
        return True
    # Our constructors validate with ValueError; a ValueError raised while jsonargparse instantiates
    # the classes from the config is therefore about the config.
    if isinstance(error, ValueError):
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "instantiate_classes":
                return True
            tb = tb.tb_next
    return False


def main(args: list[str] | None = None) -> None:
    """Run the CLI; user errors exit with code 2 and a short message (``--debug``/``DGPO_DEBUG=1``: traceback)."""
    if "--debug" in (sys.argv if args is None else args):
        os.environ["DGPO_DEBUG"] = "1"
        if args is None:
            sys.argv[:] = [a for a in sys.argv if a != "--debug"]
        else:
            args = [a for a in args if a != "--debug"]
    try:
        DGPOCLI(args=args)
    except Exception as error:
        if debugging() or not is_user_error(error):
            raise
        subcommand = next((a for a in (args if args is not None else sys.argv[1:]) if a in ("fit", "validate", "test", "predict")), None)
        prog = f"{PROG} {subcommand}" if subcommand else PROG
        hint = hint_for(str(error), prog) if not isinstance(error, (FitIncomplete, RunConflict)) else f"hint: {DEBUG_HINT}"
        sys.stderr.write(f"error: {shorten(str(error), max_lines=16)}\n{hint}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
