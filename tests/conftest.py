import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dgpo_lightning.rewards.base import _REGISTRY, register  # noqa: E402

# One thread: the test models are tiny, where extra threads only add scheduling overhead, and
# results do not depend on the machine's core count.
torch.set_num_threads(1)

if "test_brightness" not in _REGISTRY:

    @register("test_brightness")
    def _brightness(**_):
        """Mean pixel value: a cheap reward with spread even for an untrained model (tests only)."""
        return lambda images, prompts, metadata=None: images.mean(dim=(1, 2, 3))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world_path(tmp_path_factory):
    """A tiny random embedded-world backbone saved with ``save_backbone`` (same code as the shipped one)."""
    from dgpo_lightning.world.backbone import save_backbone, tiny_backbone

    path = tmp_path_factory.mktemp("tiny_world")
    torch.manual_seed(0)
    save_backbone(tiny_backbone(), path)
    return path
