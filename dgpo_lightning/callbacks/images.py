"""Held-out samples with their prompts and scores, as a figure in TensorBoard and a PNG."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class SampleGrid(L.Callback):
    """After each evaluation, draw the first ``max_images`` held-out samples titled by prompt and score.

    Written to TensorBoard (``eval/samples``) and to ``<log_dir>/samples/step_<N>.png``. Hand-drawn with
    matplotlib because a captioned grid is what people want to look at, and torchvision's
    ``make_grid`` is not installable beside the CPU torch.
    """

    def __init__(self, max_images: int = 16, columns: int = 8):
        self.max_images, self.columns = max_images, columns

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = getattr(pl_module, "last_eval_examples", None)
        if not examples or trainer.sanity_checking:
            return
        figure = sample_figure(examples, self.max_images, self.columns)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("eval/samples", figure, global_step=trainer.global_step, close=False)
        directory = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(directory / f"step_{trainer.global_step:06d}.png", dpi=100)
        import matplotlib.pyplot as plt

        plt.close(figure)


def sample_figure(examples: dict, max_images: int = 16, columns: int = 8):
    """A matplotlib figure of ``examples = {"images": [B,3,H,W], "prompts": [...], "scores": {name: [B]}}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    images = examples["images"][:max_images]
    count = images.shape[0]
    columns = min(columns, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False)
    first_reward = next(iter(examples["scores"]), None)
    for i, axis in enumerate(axes.flat):
        axis.axis("off")
        if i >= count:
            continue
        axis.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        title = examples["prompts"][i].removeprefix("a photo of ")
        if first_reward is not None:
            title += f"\n{first_reward}={float(examples['scores'][first_reward][i]):.2f}"
        axis.set_title(title, fontsize=7)
    figure.tight_layout()
    return figure
