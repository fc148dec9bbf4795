"""Lightning callbacks: evaluation plots and images, reference schedule, export."""

from dgpo_lightning.callbacks.export import ExportTrained, export_model
from dgpo_lightning.callbacks.history import ScoreHistory, plot_history, read_history, time_to_target
from dgpo_lightning.callbacks.images import SampleGrid, sample_figure
from dgpo_lightning.callbacks.reference import ReferenceSchedule

__all__ = ["ExportTrained", "ReferenceSchedule", "SampleGrid", "ScoreHistory", "export_model", "plot_history", "read_history", "sample_figure", "time_to_target"]
