"""world/distill.py: the segment targets are the teacher's ODE solution and the loss is the secant-velocity error."""

import json

import pytest
import torch

from dgpo_lightning.sampling import flow_sigmas
from dgpo_lightning.world.distill import main, segment_loss, segment_targets


class _PointFlow:
    """The exact flow of a single data point ``x0``: ``v(x, t) = (x − x0)/t`` (+ an offset ``c``)."""

    def __init__(self, x0, offset=0.0):
        self.x0, self.offset = x0, offset

    def velocity(self, x, t, cond=None, guidance_scale=1.0):
        return (x - self.x0) / t.view(-1, *([1] * (x.dim() - 1))) + self.offset


def test_fine_teacher_schedule_passes_through_the_student_sigmas():
    for steps, sub in ((4, 3), (2, 5), (6, 2)):
        coarse, fine = flow_sigmas(steps, shift=3.0), flow_sigmas(steps * sub, shift=3.0)
        torch.testing.assert_close(fine[::sub], coarse)


def test_segment_targets_are_the_exact_ode_solution_for_a_point_flow():
    torch.manual_seed(0)
    x0 = torch.randn(1, 3, 4, 4)
    teacher = _PointFlow(x0)
    sigmas, fine = flow_sigmas(4, shift=3.0), flow_sigmas(12, shift=3.0)
    states = torch.randn(4, 2, 3, 4, 4)
    targets = segment_targets(lambda x, t: teacher.velocity(x, t), states, sigmas, fine, substeps=3)
    # x(σ') = x0 + (σ'/σ)(x(σ) − x0) along the flow of one point; the last segment lands on x0
    for k in range(4):
        expected = x0 + (sigmas[k + 1] / sigmas[k]) * (states[k] - x0)
        torch.testing.assert_close(targets[k], expected, rtol=1e-5, atol=1e-5)


def test_segment_loss_is_zero_for_the_exact_velocity_and_the_offset_squared_otherwise():
    torch.manual_seed(1)
    x0 = torch.randn(1, 3, 4, 4)
    sigmas, fine = flow_sigmas(4, shift=3.0), flow_sigmas(8, shift=3.0)
    states = torch.randn(4, 3, 3, 4, 4)
    targets = segment_targets(lambda x, t: _PointFlow(x0).velocity(x, t), states, sigmas, fine, substeps=2)
    cond = {"prompt_embeds": torch.zeros(3, 2, 5)}
    assert float(segment_loss(_PointFlow(x0), states, targets, sigmas, cond)) == pytest.approx(0.0, abs=1e-9)
    assert float(segment_loss(_PointFlow(x0, offset=0.3), states, targets, sigmas, cond)) == pytest.approx(0.09, rel=1e-4)


def test_a_short_distillation_writes_a_loadable_student_and_its_history(tmp_path):
    from dgpo_lightning.world.backbone import load_backbone, save_backbone, tiny_backbone

    torch.manual_seed(0)
    teacher = save_backbone(tiny_backbone(patch_size=2), tmp_path / "teacher")
    main(["--out", str(tmp_path / "student"), "--teacher", str(teacher), "--steps", "2", "--batch-size", "4",
          "--eval-images", "1", "--final-eval-images", "1", "--no-progress"])
    info = json.loads((tmp_path / "student" / "distill.json").read_text())
    assert info["steps"] == 2 and len(info["history"]) == 2
    assert 0.0 <= info["history"][-1]["heldout"]["overall"] <= 1.0
    student, base = load_backbone(tmp_path / "student"), load_backbone(teacher)
    changed = [not torch.equal(a, b) for a, b in zip(student.denoiser.parameters(), base.denoiser.parameters())]
    assert any(changed)  # the UNet trained
    assert all(torch.equal(a, b) for a, b in zip(student.text_encoder.parameters(), base.text_encoder.parameters()))
