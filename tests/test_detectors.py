"""Real mmdet detectors build from their configs and run on a real COCO image.

Mask R-CNN Swin-T/S come from mmdet's own configs (``mmdet::swin/...``);
Cascade Mask R-CNN Swin-T/S from mmvq's compositions in
``configs/_base_/models``. Weights are random (seeded) since no checkpoint can
be downloaded here, so the R-CNN score threshold is lowered to 0 to get a full
set of detections whose structure can be checked.
"""
import os.path as osp

import mmcv
import numpy as np
import pytest
import torch
from mmvq.utils import load_config

from helpers import CONFIGS

DETECTOR_CONFIGS = {
    'mask-rcnn_swin-t': ('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', 'MaskRCNN', [2, 2, 6, 2]),
    'mask-rcnn_swin-s': ('mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py', 'MaskRCNN', [2, 2, 18, 2]),
    'cascade-mask-rcnn_swin-t': (osp.join(CONFIGS, '_base_/models/cascade-mask-rcnn_swin-t-p4-w7_fpn.py'),
                                 'CascadeRCNN', [2, 2, 6, 2]),
    'cascade-mask-rcnn_swin-s': (osp.join(CONFIGS, '_base_/models/cascade-mask-rcnn_swin-s-p4-w7_fpn.py'),
                                 'CascadeRCNN', [2, 2, 18, 2]),
}


def load_detector_cfg(path):
    cfg = load_config(path)
    cfg.model.backbone.init_cfg = None
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    return cfg


@pytest.mark.parametrize('name', list(DETECTOR_CONFIGS))
def test_detector_builds_and_infers_on_real_image(name, coco_image):
    from mmdet.apis import inference_detector, init_detector
    from mmdet.models.backbones import SwinTransformer

    path, det_type, depths = DETECTOR_CONFIGS[name]
    cfg = load_detector_cfg(path)
    assert cfg.model.type == det_type
    torch.manual_seed(0)
    model = init_detector(cfg, checkpoint=None, device='cpu')
    assert isinstance(model.backbone, SwinTransformer)
    assert [len(stage.blocks) for stage in model.backbone.stages] == depths
    assert model.backbone.stages[0].blocks[0].attn.w_msa.num_heads == 3
    if det_type == 'CascadeRCNN':
        heads = model.roi_head.bbox_head
        assert len(heads) == 3
        for head in heads:
            assert head.num_shared_convs == 4 and head.num_shared_fcs == 1
            assert isinstance(head.shared_convs[0].bn, torch.nn.BatchNorm2d)
            assert head.reg_decoded_bbox and not head.reg_class_agnostic

    with torch.no_grad():
        result = inference_detector(model, coco_image)
    h, w = result.ori_shape
    assert (h, w) == mmcv.imread(coco_image).shape[:2] == (640, 480)
    pred = result.pred_instances
    n = len(pred)
    assert 0 < n <= cfg.model.test_cfg.rcnn.max_per_img
    assert pred.bboxes.shape == (n, 4) and pred.bboxes.dtype == torch.float32
    assert pred.scores.shape == (n, ) and pred.scores.dtype == torch.float32
    assert pred.labels.shape == (n, ) and pred.labels.dtype == torch.int64
    assert pred.masks.shape == (n, h, w) and pred.masks.dtype == torch.bool
    assert torch.all(pred.labels >= 0) and torch.all(pred.labels < 80)
    assert torch.all((pred.scores >= 0) & (pred.scores <= 1))
    assert torch.all(torch.diff(pred.scores) <= 0), 'scores sorted descending'
    boxes = pred.bboxes.numpy()
    assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
    assert boxes.min() >= 0 and boxes[:, 2].max() <= w and boxes[:, 3].max() <= h
