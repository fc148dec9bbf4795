"""Video outputs of the evaluation and the SampleGrid callback: frame strips in the grid, animated GIFs
read back with PIL frame by frame, MP4s when an encoder is installed (a clear note otherwise), and
TensorBoard's ``add_video`` only when moviepy is importable."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dgpo_lightning import evaluation
from dgpo_lightning.callbacks.images import SampleGrid
from dgpo_lightning.evaluation import (
    MP4_SKIPPED,
    TaskExamples,
    frame_strip,
    is_video,
    save_example_videos,
    save_gif,
    save_grid,
    task_grid,
    video_directory,
)

PALETTE = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


def _videos(count=3, frames=5, size=8):
    """Video ``k``'s frame ``f`` is one flat colour of a small palette (exact in a GIF's palette),
    with the top-left pixel white so that frames differ in more than colour."""
    videos = torch.zeros(count, frames, 3, size, size)
    for k in range(count):
        for f in range(frames):
            videos[k, f] = PALETTE[(k + f) % len(PALETTE)].view(3, 1, 1)
            videos[k, f, :, 0, 0] = 1.0
    return videos


def _examples(videos, tags=None):
    out = {"images": videos, "prompts": [f"prompt {k}" for k in range(len(videos))],
           "scores": {"frame_mean": torch.arange(len(videos)).float()}}
    if tags is not None:
        out["tags"] = tags
    return out


def test_frame_strip_puts_evenly_spaced_frames_side_by_side():
    video = torch.rand(9, 3, 4, 6)
    strip = frame_strip(video, max_frames=3, gap=1)
    assert strip.shape == (3, 4, 3 * 6 + 2)
    for slot, frame in enumerate([0, 4, 8]):
        torch.testing.assert_close(strip[:, :, slot * 7 : slot * 7 + 6], video[frame])
    assert (strip[:, :, 6] == 1).all() and (strip[:, :, 13] == 1).all()  # white gaps
    torch.testing.assert_close(frame_strip(video[:2], max_frames=8, gap=0), torch.cat([video[0], video[1]], dim=2))
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        frame_strip(video[0])


def test_task_grid_draws_one_frame_strip_per_video():
    videos = _videos(count=4)
    figure = task_grid(_examples(videos, tags=["a", "a", "b", "b"]), per_task=2, max_frames=3)
    drawn = [axis.images[0].get_array() for axis in figure.axes if axis.images]
    assert len(drawn) == 4
    expected = frame_strip(videos[2], max_frames=3).permute(1, 2, 0).numpy()
    assert drawn[2].shape == expected.shape == (8, 3 * 8 + 2, 3)
    assert (drawn[2] == expected).all()
    width, height = figure.get_size_inches()
    assert width > 2 * 2.0 * 3  # strips make the cells wider than images would


def test_gif_holds_every_frame_at_the_given_rate(tmp_path):
    video = _videos(count=1, frames=5)[0]
    path = save_gif(video, tmp_path / "v.gif", fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.size == (8, 8) and gif.info["loop"] == 0
        for f in range(5):
            gif.seek(f)
            assert gif.info["duration"] == 200  # GIF delays are in 10 ms units
            pixels = torch.tensor(list(gif.convert("RGB").getdata()), dtype=torch.float32).view(8, 8, 3) / 255
            torch.testing.assert_close(pixels.permute(2, 0, 1), video[f])


def test_example_videos_without_an_encoder_write_gifs_and_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "mp4_encoder", lambda: None)
    videos = _videos(count=2)
    with pytest.warns(UserWarning, match="MP4 skipped"):
        index = save_example_videos(_examples(videos, tags=["t", "u"]), tmp_path / "out", fps=4)
    assert index["note"] == MP4_SKIPPED and index["frames"] == 5 and index["fps"] == 4
    assert [v["gif"] for v in index["videos"]] == ["00_prompt_0.gif", "01_prompt_1.gif"]
    assert all(v["mp4"] is None for v in index["videos"]) and not list((tmp_path / "out").glob("*.mp4"))
    assert index["videos"][1]["scores"] == {"frame_mean": 1.0} and index["videos"][1]["tag"] == "u"
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index
    with Image.open(tmp_path / "out" / "01_prompt_1.gif") as gif:
        assert gif.n_frames == 5
    with pytest.raises(ValueError, match="videos"):
        save_example_videos(_examples(videos[:, 0]), tmp_path / "images")


@pytest.mark.parametrize("encoder", ["av", "imageio_ffmpeg"])
def test_mp4_with_an_installed_encoder(tmp_path, monkeypatch, encoder):
    pytest.importorskip(encoder)
    monkeypatch.setattr(evaluation, "mp4_encoder", lambda: encoder)
    videos = _videos(count=1, frames=5, size=9)  # odd sides: padded to even for yuv420p
    index = save_example_videos(_examples(videos), tmp_path, fps=8)
    assert index["note"] is None and (tmp_path / index["videos"][0]["mp4"]).stat().st_size > 0
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / index["videos"][0]["mp4"])) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (10, 10)


def test_save_grid_writes_the_videos_beside_the_png_for_videos_only(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "mp4_encoder", lambda: None)
    videos = _videos(count=2)
    with pytest.warns(UserWarning, match="MP4 skipped"):
        save_grid(_examples(videos), tmp_path / "result.png", per_task=2)
    assert (tmp_path / "result.png").is_file() and video_directory(tmp_path / "result.png") == tmp_path / "result_videos"
    assert len(list((tmp_path / "result_videos").glob("*.gif"))) == 2
    save_grid(_examples(videos[:, 0]), tmp_path / "images.png")
    assert (tmp_path / "images.png").is_file() and not (tmp_path / "images_videos").exists()


def test_task_examples_keep_videos():
    videos = _videos(count=3)
    kept = TaskExamples(per_task=2).add(videos, ["a", "b", "c"], None, {"r": torch.zeros(3)}).result()
    assert is_video(kept["images"]) and kept["images"].shape == (2, 5, 3, 8, 8)
    torch.testing.assert_close(kept["images"], videos[:2])


class _Experiment:
    def __init__(self):
        self.figures, self.videos = [], []

    def add_figure(self, tag, figure, global_step=None, close=True):
        self.figures.append((tag, global_step))

    def add_video(self, tag, tensor, global_step=None, fps=4):
        self.videos.append((tag, tuple(tensor.shape), global_step, fps))


def _run_callback(tmp_path, examples, callback=None):
    experiment = _Experiment()
    trainer = SimpleNamespace(sanity_checking=False, loggers=[SimpleNamespace(experiment=experiment)],
                              log_dir=str(tmp_path), default_root_dir=str(tmp_path), global_step=3)
    (callback or SampleGrid(per_task=2)).on_validation_end(trainer, SimpleNamespace(last_eval_examples=examples))
    return experiment


def test_sample_grid_callback_with_videos(tmp_path, monkeypatch):
    import dgpo_lightning.callbacks.images as images

    monkeypatch.setattr(evaluation, "mp4_encoder", lambda: None)
    monkeypatch.setattr(images, "can_log_video", lambda: False)  # moviepy missing: no add_video
    examples = _examples(_videos(count=2))
    with pytest.warns(UserWarning, match="MP4 skipped"):
        experiment = _run_callback(tmp_path / "a", examples)
    assert experiment.figures == [("eval/samples", 3)] and experiment.videos == []
    assert (tmp_path / "a" / "samples" / "step_000003.png").is_file()
    assert len(list((tmp_path / "a" / "samples" / "step_000003_videos").glob("*.gif"))) == 2

    monkeypatch.setattr(images, "can_log_video", lambda: True)
    with pytest.warns(UserWarning, match="MP4 skipped"):
        experiment = _run_callback(tmp_path / "b", examples, SampleGrid(per_task=2, fps=6))
    assert experiment.videos == [("eval/videos", (2, 5, 3, 8, 8), 3, 6)]


def test_sample_grid_callback_with_images_writes_no_videos(tmp_path):
    experiment = _run_callback(tmp_path, _examples(_videos(count=2)[:, 0]))
    assert experiment.figures and not experiment.videos
    assert not list((tmp_path / "samples").glob("*_videos"))


def test_can_log_video_follows_moviepy(monkeypatch):
    import importlib.util

    import dgpo_lightning.callbacks.images as images

    assert images.can_log_video() == (importlib.util.find_spec("moviepy") is not None)
