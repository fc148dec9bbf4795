"""Evaluation history: score versus wall-clock time and images generated, where the time went, and
time to a target score; as CSV, PNG and TensorBoard scalars."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn


class ScoreHistory(L.Callback):
    """Record every evaluation with the elapsed training time and the number of rollout images.

    During ``fit`` writes ``<run>/eval_history.csv`` and ``<run>/score_vs_time.png`` (headline metric
    against wall-clock minutes and images generated; ``<run>`` = ``trainer.default_root_dir``) and
    prints a before/after summary when training ends, or a warning if it did not finish. A
    ``validate``/``test`` in a process that has not run ``fit`` writes ``eval_validate.csv``/``eval_test.csv``
    instead, so evaluating a run never overwrites its training history.
    Time counts from the start of ``fit``; evaluation time itself is excluded from ``seconds`` so
    that curves of methods with different evaluation cadences stay comparable.

    Cost accounting: every row (and, each epoch, the logger under ``cost/``) also holds cumulative
    seconds by phase on this rank: ``wall_seconds`` (everything since ``fit`` started, evaluation
    included), ``train_seconds`` (the training batches: forward, backward, optimizer),
    ``rollout_seconds`` (sampling and scoring the rollouts; its parts ``sampling_seconds``,
    ``scoring_seconds`` (overlapping sampling), ``reward_wait_seconds``), ``eval_seconds`` and
    ``other_seconds`` (the rest: checkpoints, data loading, waiting at collectives); plus
    ``optimizer_steps``, ``devices`` and ``device_seconds = wall_seconds × devices``.
    :func:`time_to_target` reads them back.

    Args:
        metric: key of the headline score (default ``eval/geneval``).
        dirpath: where to write (default: the run directory).
        max_training_minutes: stop training at the first evaluation after this much training time
            (evaluation excluded), so a time-budgeted run always ends with a measured score.
        stop_at_score: stop training at the first evaluation whose ``metric`` reaches this score (a
            time-to-target run need not train past its target).
    """

    def __init__(
        self,
        metric: str = "eval/geneval",
        dirpath: str | None = None,
        max_training_minutes: float | None = None,
        stop_at_score: float | None = None,
    ):
        self.metric = metric
        self.dirpath = dirpath
        self.max_training_minutes = max_training_minutes
        self.stop_at_score = stop_at_score
        self.rows: list[dict[str, float]] = []
        self._offset = 0.0
        self._fit_start: float | None = None
        self._fit_end: float | None = None
        self._eval_seconds = 0.0
        self._eval_start: float | None = None
        self._train_seconds = 0.0
        self._batch_start: float | None = None
        self._offsets: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))

    def on_fit_start(self, trainer, pl_module) -> None:
        # A resumed run continues the clock where the checkpointed history stopped.
        self._offset = self.rows[-1]["seconds"] if self.rows else 0.0
        self._offsets = {k: self.rows[-1].get(k, 0.0) for k in ("wall_seconds", "train_seconds", "eval_seconds")} if self.rows else {}
        self._fit_start, self._fit_end = time.perf_counter(), None
        self._eval_seconds = 0.0
        self._train_seconds = 0.0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        _synchronize(pl_module)
        self._eval_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _synchronize(pl_module)
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_start is not None:
            _synchronize(pl_module)
            self._train_seconds += time.perf_counter() - self._batch_start
            self._batch_start = None

    def cost(self, trainer) -> dict[str, float]:
        """Cumulative seconds by phase on this rank, images, optimizer steps and device-seconds."""
        if self._fit_start is None:
            return {}
        end = self._fit_end if self._fit_end is not None else time.perf_counter()
        wall = self._offsets.get("wall_seconds", 0.0) + end - self._fit_start
        datamodule = getattr(trainer, "datamodule", None)
        rollout = dict(getattr(datamodule, "rollout_seconds", None) or {})
        train = self._offsets.get("train_seconds", 0.0) + self._train_seconds
        evaluation = self._offsets.get("eval_seconds", 0.0) + self._eval_seconds
        devices = float(max(int(getattr(trainer, "world_size", 1) or 1), 1))
        out = {
            "wall_seconds": wall,
            "train_seconds": train,
            **{f"{phase}_seconds": float(rollout.get(phase, 0.0)) for phase in ("rollout", "sampling", "scoring", "reward_wait")},
            "eval_seconds": evaluation,
            "other_seconds": max(wall - train - float(rollout.get("rollout", 0.0)) - evaluation, 0.0),
            "optimizer_steps": float(trainer.global_step),
            "devices": devices,
            "device_seconds": wall * devices,
        }
        return out

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        cost = self.cost(trainer)
        if cost:
            cost["images"] = float(getattr(getattr(trainer, "datamodule", None), "images_generated", 0))
            pl_module.log_dict({f"cost/{k}": float(v) for k, v in cost.items()}, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)

    def training_seconds(self) -> float:
        """Seconds of training so far (0 before ``fit``; frozen when ``fit`` ends)."""
        if self._fit_start is None:
            return 0.0
        end = self._fit_end if self._fit_end is not None else time.perf_counter()
        return self._offset + end - self._fit_start - self._eval_seconds

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
    # module's, which is where the evaluation results are computed.
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if self._eval_start is not None:
            _synchronize(pl_module)
            self._eval_seconds += time.perf_counter() - self._eval_start
        results = getattr(pl_module, "last_eval", {})
        if not results:
            return
        if self.metric not in results:  # a misconfigured headline would leave the run with no history at all
            raise ValueError(
                f"ScoreHistory: metric {self.metric!r} is not among the evaluation's results ({', '.join(sorted(results))}); "
                "set the callback's init_args.metric (e.g. --trainer.callbacks.init_args.metric=eval/<reward>)"
            )
        datamodule = getattr(trainer, "datamodule", None)
        row = {
            "epoch": float(trainer.current_epoch),
            "step": float(trainer.global_step),
            "seconds": self.training_seconds(),
            "images": float(getattr(datamodule, "images_generated", 0)),
            **{k: float(v) for k, v in results.items()},
            **self.cost(trainer),
        }
        self.rows.append(row)
        # An evaluation after a fit in this process continues its history; a standalone one does not.
        self._write(trainer, trainer.state.fn == "fit" or self._fit_start is not None)
        if self.max_training_minutes is not None and row["seconds"] >= 60 * self.max_training_minutes:
            trainer.should_stop = True
        if self.stop_at_score is not None and row[self.metric] >= self.stop_at_score:
            trainer.should_stop = True

    @rank_zero_only
    def _write(self, trainer, fitting: bool = True) -> None:
        directory = Path(self.dirpath or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.rows if fitting else self.rows[-1:]
        keys = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("epoch", "step", "seconds", "images"), k))
        name = "eval_history.csv" if fitting else f"eval_{getattr(trainer.state.fn, 'value', trainer.state.fn)}.csv"
        with (directory / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        if fitting:
            plot_history(rows, self.metric, directory / "score_vs_time.png")

    def on_fit_end(self, trainer, pl_module) -> None:
        from dgpo_lightning.callbacks.export import fit_problem

        self._fit_end = time.perf_counter()
        self.summary(fit_problem(trainer))

    @rank_zero_only
    def summary(self, problem: str | None = None) -> None:
        """Log the first and last recorded score, or that the fit did not finish."""
        if problem:
            rank_zero_warn(f"fit did not finish: {problem}" + ("; its scores so far are in eval_history.csv" if self.rows else ""))
        elif len(self.rows) >= 2:
            first, last = self.rows[0][self.metric], self.rows[-1][self.metric]
            rank_zero_info(
                f"{self.metric}: {first:.3f} -> {last:.3f} ({last - first:+.3f}) after "
                f"{self.rows[-1]['seconds'] / 60:.1f} min of training, {int(self.rows[-1]['images'])} rollout images"
            )


def _synchronize(pl_module) -> None:
    """Wait for queued GPU work, so a phase's seconds are its own (a no-op on the CPU)."""
    import torch

    device = getattr(pl_module, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


#: Columns of :func:`time_to_target`'s answer, besides the score itself.
COST_COLUMNS: tuple[str, ...] = (
    "seconds", "wall_seconds", "train_seconds", "rollout_seconds", "sampling_seconds", "scoring_seconds",
    "reward_wait_seconds", "eval_seconds", "other_seconds", "device_seconds", "images", "optimizer_steps",
)


def read_history(path: str | Path) -> list[dict[str, float]]:
    """The rows of an ``eval_history.csv`` (a run directory or the file itself), as floats."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval_history.csv"
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def time_to_target(
    history: str | Path | list[dict[str, float]], metric: str, target: float, *, baseline: str | None = None
) -> dict[str, float] | None:
    """The cost of the first evaluation whose ``metric`` reaches ``target`` (``None`` if none did).

    ``baseline="first"`` reads ``target`` as a gain over the first evaluation (e.g. ``0.10`` = base +
    0.10). The answer is that row's cumulative :data:`COST_COLUMNS` (those the history has) plus
    ``score`` and ``target``: no interpolation between evaluations, so the figure is an upper bound
    at the run's evaluation cadence.
    """
    rows = read_history(history) if not isinstance(history, list) else history
    if not rows:
        return None
    if metric not in rows[0]:
        raise KeyError(f"{metric!r} is not in the history (columns: {', '.join(sorted(rows[0]))})")
    goal = rows[0][metric] + target if baseline == "first" else target
    for row in rows:
        if row.get(metric, float("-inf")) >= goal:
            return {"score": row[metric], "target": goal, **{k: row[k] for k in COST_COLUMNS if k in row}}
    return None


def plot_history(rows: list[dict[str, float]], metric: str, path: str | Path) -> None:
    """Two panels: ``metric`` versus training minutes and versus images generated."""
    # A bare Figure (no pyplot): writing the PNG never switches the backend of a notebook kernel
    # that is fitting in process, so its inline figures keep showing.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6))
    by_time, by_images = figure.subplots(1, 2)
    minutes = [row["seconds"] / 60 for row in rows]
    images = [row["images"] for row in rows]
    scores = [row[metric] for row in rows]
    by_time.plot(minutes, scores, marker="o")
    by_time.set_xlabel("training wall-clock (min, evaluation excluded)")
    by_images.plot(images, scores, marker="o")
    by_images.set_xlabel("rollout images generated")
    for axis in (by_time, by_images):
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
