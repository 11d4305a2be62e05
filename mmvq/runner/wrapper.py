"""A model wrapper for distributed *inference* on CPU (gloo).

mmengine wraps models in ``MMDistributedDataParallel`` with
``device_ids=[LOCAL_RANK]``, which PyTorch rejects for CPU modules, and its
``init_dist`` calls ``torch.cuda.set_device``. PTQ never trains, so on CPU
``tools/ptq.py`` initialises a gloo process group itself and selects this
wrapper: it only forwards ``test_step``/``val_step`` to the module (ranks
evaluate their shard; the evaluator gathers results; calibration merges
observers itself).
"""
import torch.nn as nn

from ..registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class InferenceOnlyWrapper(nn.Module):
    """Wrap ``module`` for test/val steps only."""

    def __init__(self, module, **kwargs):
        super().__init__()
        self.module = module

    def test_step(self, data):
        return self.module.test_step(data)

    def val_step(self, data):
        return self.module.val_step(data)

    def train_step(self, *args, **kwargs):
        raise RuntimeError('InferenceOnlyWrapper is for PTQ evaluation; it cannot train')

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
