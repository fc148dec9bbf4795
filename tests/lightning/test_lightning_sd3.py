"""The SD3 path through the Lightning system: a tiny random SD3 pipeline saved to disk, loaded by
name like a real SD3.5-M directory, LoRA-trained by DGPO for two optimizer steps."""

from backbone_checks import check_trained_lora, train_two_dgpo_steps
from dgpo_lightning.models.testing import build_tiny_sd3


def test_two_dgpo_steps_on_tiny_sd3_with_lora(tmp_path):
    run = train_two_dgpo_steps(tmp_path, "sd3", build_tiny_sd3(seed=0), {"resolution": 32}, ["a red cube", "a blue sphere"],
                               export=False)
    check_trained_lora(run)
