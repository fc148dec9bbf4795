"""Mask2Former's instance-segmentation inference path as a model class of its own (transformers).

Shared by the GenEval detector (:mod:`dgpo_lightning.rewards.detectors`, which runs it) and the
offline test stand-ins (:mod:`dgpo_lightning.models.testing`, which saves a tiny random one), so it
lives in the models layer both may import. transformers is imported on first use.
"""

from __future__ import annotations

from torch import Tensor

_INSTANCE_HEAD_CLASS: type | None = None


def instance_head_class() -> type:
    """``Mask2FormerForUniversalSegmentation``'s inference path as a model class of its own.

    The parameters have the same names (``model.*``, ``class_predictor.*``), so that class's checkpoints
    load unchanged; what is left out is its training loss, whose constructor requires scipy (for the
    Hungarian matcher) although inference never uses it. Built on first use: transformers is imported
    lazily.
    """
    global _INSTANCE_HEAD_CLASS
    if _INSTANCE_HEAD_CLASS is None:
        from torch import nn
        from transformers import Mask2FormerModel
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerPreTrainedModel

        class Mask2FormerInstanceHead(Mask2FormerPreTrainedModel):
            _keys_to_ignore_on_load_unexpected = [r"criterion\."]

            def __init__(self, config):
                super().__init__(config)
                self.model = Mask2FormerModel(config)
                self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
                self.post_init()

            def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
                """``(class logits [B, Q, C + 1], mask logits [B, Q, H / 4, W / 4])`` of the last decoder layer."""
                outputs = self.model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
                last_queries = outputs.transformer_decoder_intermediate_states[-1].transpose(0, 1)
                return self.class_predictor(last_queries), outputs.masks_queries_logits[-1]

        _INSTANCE_HEAD_CLASS = Mask2FormerInstanceHead
    return _INSTANCE_HEAD_CLASS
