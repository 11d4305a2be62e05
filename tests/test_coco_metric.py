"""mmdet's CocoMetric (bbox + segm) through mmengine's Evaluator on real COCO data.

Ground truth fed back as predictions must score AP = 1; a deterministic
perturbation must score strictly lower and exactly the same on every run.
"""
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.evaluator import Evaluator


def _gt_predictions(coco_mini, jitter=None):
    """Build mmdet-style prediction samples from the COCO ground truth.

    Args:
        coco_mini (str): dataset root.
        jitter (np.random.Generator | None): if given, boxes are shifted by up
            to 6% of their size, masks are shifted by the same offset and
            scores are random, which must lower both APs.
    """
    from pycocotools.coco import COCO

    coco = COCO(osp.join(coco_mini, 'annotations', 'instances_val2017.json'))
    cat2label = {cid: i for i, cid in enumerate(sorted(coco.getCatIds()))}
    samples = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        h, w = info['height'], info['width']
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if not a['iscrowd']]
        boxes, masks, labels = [], [], []
        for a in anns:
            x, y, bw, bh = a['bbox']
            box = np.array([x, y, x + bw, y + bh], dtype=np.float64)
            mask = coco.annToMask(a).astype(bool)
            if jitter is not None:
                dx, dy = (jitter.uniform(-0.06, 0.06, 2) * [bw, bh]).round().astype(int)
                box = box + [dx, dy, dx, dy]
                mask = np.roll(mask, (dy, dx), axis=(0, 1))
            boxes.append(box)
            masks.append(mask)
            labels.append(cat2label[a['category_id']])
        n = len(anns)
        scores = np.ones(n) if jitter is None else jitter.uniform(0.3, 1.0, n)
        samples.append(dict(
            img_id=img_id,
            ori_shape=(h, w),
            pred_instances=dict(
                bboxes=torch.tensor(np.array(boxes).reshape(n, 4), dtype=torch.float32),
                scores=torch.tensor(scores, dtype=torch.float32),
                labels=torch.tensor(labels, dtype=torch.int64),
                masks=torch.from_numpy(np.array(masks).reshape(n, h, w)))))
    return samples


def _evaluate(coco_mini, samples):
    from mmdet.datasets import CocoDataset
    evaluator = Evaluator(dict(
        type='mmdet.CocoMetric',
        ann_file=osp.join(coco_mini, 'annotations', 'instances_val2017.json'),
        metric=['bbox', 'segm'],
        format_only=False))
    evaluator.dataset_meta = CocoDataset.METAINFO
    evaluator.process(data_samples=samples)
    return evaluator.evaluate(len(samples))


def test_ground_truth_scores_perfect_ap(coco_mini):
    samples = _gt_predictions(coco_mini)
    assert len(samples) == 10
    assert sum(len(s['pred_instances']['labels']) for s in samples) == 76  # 77 minus 1 crowd
    metrics = _evaluate(coco_mini, samples)
    assert metrics['coco/bbox_mAP'] == pytest.approx(1.0)
    assert metrics['coco/segm_mAP'] == pytest.approx(1.0)
    assert metrics['coco/bbox_mAP_50'] == pytest.approx(1.0)
    assert metrics['coco/segm_mAP_75'] == pytest.approx(1.0)


def test_perturbed_predictions_score_lower_and_reproducibly(coco_mini):
    runs = [_evaluate(coco_mini, _gt_predictions(coco_mini, np.random.default_rng(7)))
            for _ in range(2)]
    for key in ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_75', 'coco/segm_mAP_75'):
        assert runs[0][key] == runs[1][key], key
    assert 0.0 < runs[0]['coco/bbox_mAP'] < 1.0
    assert 0.0 < runs[0]['coco/segm_mAP'] < 1.0
    # Values measured once with pycocotools 2.0.11 / mmdet 3.3.0 (3 decimals as
    # mmdet reports them); they pin the evaluation path end to end.
    assert runs[0]['coco/bbox_mAP'] == pytest.approx(EXPECTED_PERTURBED['bbox'], abs=1e-9)
    assert runs[0]['coco/segm_mAP'] == pytest.approx(EXPECTED_PERTURBED['segm'], abs=1e-9)


EXPECTED_PERTURBED = {'bbox': 0.831, 'segm': 0.675}
