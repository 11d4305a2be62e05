"""Quantized checkpoints and run reports, without a Runner."""
import json

import torch

import mmvq
from helpers import tiny_vit
from mmvq.checkpoint import load_quantized, read_quantized, save_quantized
from mmvq.runner.report import PhaseMeter, build_results, console_lines, write_results

BLOCK = dict(name='W8A8', roles=dict(
    weight=dict(type='UniformQuantizer', bits=8, symmetric=True, granularity='channel', ch_axis=0),
    act=dict(type='UniformQuantizer', bits=8)))


def calibrated_vit():
    model = tiny_vit()
    torch.manual_seed(1)
    batches = [torch.randn(2, 3, 28, 28) for _ in range(2)]
    mmvq.quantize(model, BLOCK, batches, lambda m, x: m(x, mode='tensor'))
    return model


def test_checkpoint_round_trip(tmp_path):
    model = calibrated_vit()
    path = tmp_path / 'q.pth'
    save_quantized(model, str(path), BLOCK, meta=dict(note='unit'))
    qcfg, meta, state = read_quantized(str(path))
    assert qcfg == json.loads(json.dumps(BLOCK, sort_keys=True)) and meta == dict(note='unit')
    fresh = tiny_vit()
    load_quantized(fresh, str(path), BLOCK)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x, mode='tensor'), fresh(x, mode='tensor'))


def test_results_and_markdown(tmp_path):
    model = calibrated_vit()
    phases = {}
    for tag, passes in (('fp', 1), ('quantized', 2)):
        with PhaseMeter('cpu') as meter:
            for _ in range(passes):
                sum(range(10000))
                meter.lap()
        phases[tag] = meter
    metrics = dict(fp={'accuracy/top1': 90.0}, quantized={'accuracy/top1': 89.5})
    r = build_results(model, BLOCK, phases, metrics, task='classification', scope='model',
                      eval_images=10, calibration=dict(images=2, split='train', seed=0,
                                                       wall_time=1.5), repeats=2)
    assert r['metrics']['delta'] == {'accuracy/top1': -0.5}
    t = r['eval_time']
    assert len(t['passes']['quantized']) == 2 and t['total']['quantized'] == min(
        t['passes']['quantized'])
    assert t['quantized_vs_fp'] == t['total']['quantized'] / t['total']['fp']
    assert t['per_image']['fp'] == t['total']['fp'] / 10
    assert r['bits'] == {'uniform': [8]} and r['num_quantizers'] > 50 and r['entry'] == 'PTQLoop'
    assert set(r['memory']) == {'fp', 'quantized'} and r['device']['type'] == 'cpu'
    write_results(str(tmp_path), r, mmvq.format_summary(model))
    assert json.loads((tmp_path / 'results.json').read_text())['metrics'] == r['metrics']
    md = (tmp_path / 'results.md').read_text()
    assert '| accuracy/top1 | 90.0000 | 89.5000 | -0.5000 |' in md
    assert '2 image(s) of the train split, seed 0, 1.5 s' in md
    lines = console_lines(r)
    assert lines[0] == '[mmvq] accuracy/top1: FP 90 -> quantized 89.5 (-0.5)'
    assert lines[1].startswith('[mmvq] evaluation time per image: quantized ')
