"""End-to-end: tools/ptq.py on Mask R-CNN Swin-T over ../shared/data/coco_mini."""
import json
import pickle

import pytest
import torch

from helpers import METRIC_KEYS, compose, ptq

@pytest.mark.parametrize('method', ['uniform_w8a8', 'fqvit_w8a8_attn4', 'adalog_w4a4'])
def test_ptq_writes_fp_and_quantized_coco_metrics(method, coco_mini, tmp_path):
    # AdaLog's searches alternate 3 rounds; one is enough to prove the pipeline end
    # to end on a full-size Swin-T (tests/test_fpcs_weights.py tests the rounds)
    fast = ['quant.searches.0.rounds=1'] if method.startswith('adalog') else []
    ptq(compose(tmp_path, method), coco_mini, tmp_path / 'wd', *fast, '--max-eval-images', '2')
    res = json.loads((tmp_path / 'wd' / 'results.json').read_text())
    for split in ('fp', 'quantized'):
        for key in METRIC_KEYS:
            assert 0.0 <= res['metrics'][split][key] <= 1.0
    assert res['eval_images'] == 2
    assert res['calibration']['images'] == 1 and res['calibration']['split'] == 'train'
    assert res['calibration']['seed'] == 0 and len(res['calibration']['image_ids']) == 1
    assert res['num_quantizers'] > 100
    assert res['versions']['mmdet'] == '3.3.0'
    assert res['eval_time']['per_image']['quantized'] > 0
    md = (tmp_path / 'wd' / 'results.md').read_text()
    assert '| coco/bbox_mAP |' in md and res['method'] in md
    assert res['device']['type'] == 'cpu' and res['device']['integer_dtype'] == 'float64'
    assert res['device']['threads'] >= 1 and 'cuda_peak_mb' not in res['memory']['quantized']
    if method == 'adalog_w4a4':
        assert set(res['bits']) == {'uniform', 'adalog+shift', 'adalog'}
        assert res['calibration']['searches']['fpcs']
        # the CPU preset, recorded as used
        assert res['calibration']['search_budgets']['fpcs'] == dict(
            device='cpu', preset='cpu', max_tokens=512, max_windows=32, uniform_width=8,
            macs_per_candidate=1 << 24, matmul_macs_per_candidate=1 << 26,
            differs_from_reference=['macs_per_candidate', 'matmul_macs_per_candidate',
                                    'max_tokens', 'max_windows', 'uniform_width'])
    if method == 'fqvit_w8a8_attn4':
        assert set(res['bits']) == {'uniform', 'ptf', 'lis'} and res['bits']['lis'] == [4]


def test_save_load_round_trip_gives_identical_predictions(coco_mini, tmp_path):
    cfg = compose(tmp_path, 'igq_w4a4_g8')
    qpath = tmp_path / 'q.pth'
    ptq(cfg, coco_mini, tmp_path / 'a', '--skip-fp', '--max-eval-images', '2', '--calib-images', '2',
        '--save-quantized', str(qpath), '--out', str(tmp_path / 'a.pkl'))
    payload = torch.load(qpath, weights_only=True)           # no pickled code
    assert payload['format'] == 'mmvq-quantized' and payload['format_version'] == 1
    assert 'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight' in payload['state_dict']
    res_a = json.loads((tmp_path / 'a' / 'results.json').read_text())
    alloc = res_a['calibration']['searches']['igq_allocation']
    assert res_a['calibration']['search_budgets']['igq_allocation'] == dict(
        device='cpu', preset='cpu', max_tokens=1024, max_windows=32,
        differs_from_reference=['max_tokens', 'max_windows'])
    assert alloc['bops'] <= alloc['budget'] and len(alloc['groups']) == 12 * 5 + 3
    ptq(cfg, coco_mini, tmp_path / 'b', '--skip-fp', '--max-eval-images', '2',
        '--load-quantized', str(qpath), '--out', str(tmp_path / 'b.pkl'))
    a = pickle.loads((tmp_path / 'a.pkl').read_bytes())
    b = pickle.loads((tmp_path / 'b.pkl').read_bytes())
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        pa, pb = ra['pred_instances'], rb['pred_instances']
        assert len(pa['bboxes']) > 0
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(pa[key], pb[key]), key
        assert pa['masks'] == pb['masks']
    res_b = json.loads((tmp_path / 'b' / 'results.json').read_text())
    assert res_b['metrics']['quantized'] == res_a['metrics']['quantized']
    assert res_b['calibration']['loaded_from'] == str(qpath)
