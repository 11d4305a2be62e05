"""Calibration sharded over 2 processes (gloo, CPU) == 1 process, bit for bit."""
import json
import os
import os.path as osp
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmvq
from mmvq.calibration import FPCS, IGQAllocation, run_calibration

A4 = dict(type='UniformQuantizer', bits=4)
H4 = dict(A4, granularity='head')
MIXED = dict(
    scope='backbone', integer_layernorm=True,
    roles=dict(weight=dict(type='UniformQuantizer', bits=4, symmetric=True, granularity='channel', ch_axis=0),
               act=A4, q=H4, k=H4, v=H4,
               ln_input=dict(type='PTFQuantizer', bits=8), ln_output=dict(type='UniformQuantizer', bits=8),
               linear_input=dict(type='IGQQuantizer', bits=4, num_groups=4),
               qkv_input=None, fc1_input=None, reduction_input=None,
               attn_probs=dict(type='AdaLogQuantizer', bits=4, fixed_scale=1.0),
               fc2_input=dict(type='AdaLogQuantizer', bits=4, shift=0.16997124254703522),
               conv_input=dict(type='UniformQuantizer', bits=8, observer='omse')))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start(rank, world, port, size):
    """Join the gloo group (world > 1); a seeded small Swin and 5 images."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        dist.init_process_group('gloo', rank=rank, world_size=world)
    from mmdet.models.backbones import SwinTransformer
    torch.manual_seed(0)
    model = SwinTransformer(embed_dims=32, depths=[2, 2], num_heads=[1, 2], window_size=7,
                            out_indices=(0, 1), init_cfg=None)
    model.eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(1, 3, size, size, generator=g) for _ in range(5)]


def _calibrate(rank, world, port, out):
    model, samples = _start(rank, world, port, 112)
    mmvq.convert(model, MIXED)
    run_calibration(model, samples, lambda m, x: m(x), [FPCS(steps=3), IGQAllocation(candidates=(2, 4, 8), budget_groups=4)])
    torch.save(model.state_dict(), f'{out}.{world}.{rank}.pth')
    if world > 1:
        dist.destroy_process_group()


def test_two_process_calibration_matches_one_process(tmp_path):
    out = str(tmp_path / 'sd')
    mp.spawn(_calibrate, args=(1, 0, out), nprocs=1, join=True)
    mp.spawn(_calibrate, args=(2, _free_port(), out), nprocs=2, join=True)
    ref = torch.load(f'{out}.1.0.pth', weights_only=True)
    quant_keys = [k for k in ref if '_quantizer.' in k]
    assert len(quant_keys) > 100
    kinds = {k.rsplit('.', 1)[-1] for k in quant_keys}
    assert {'alpha', 'centres', 'q', 'scale', 'zero_point', 'table1'} <= kinds
    for rank in (0, 1):
        sd = torch.load(f'{out}.2.{rank}.pth', weights_only=True)
        assert sd.keys() == ref.keys()
        for k in ref:
            assert torch.equal(sd[k], ref[k]), f'rank {rank}: {k} differs'
    # IGQ allocation chose different group counts somewhere, and did it identically
    centres = [ref[k].shape[0] for k in quant_keys if k.endswith('centres')]
    assert len(set(centres)) > 1


def test_dist_ptq_cli_two_processes_equal_one(coco_mini, tmp_path):
    """tools/dist_ptq.sh (torchrun, gloo on CPU) saves the same quantized model as one process."""
    import subprocess
    import sys

    from mmengine.registry import MODELS

    from helpers import ROOT, TEST_CFG, compose
    from mmvq.checkpoint import read_quantized
    from mmvq.utils import load_config
    torch.manual_seed(0)
    ckpt = tmp_path / 'float.pth'
    torch.save({'state_dict': MODELS.build(load_config(TEST_CFG).model).state_dict()}, ckpt)
    cfg = compose(tmp_path, 'fqvit_w8a8_attn4')
    data = coco_mini + '/'
    common = ['--skip-fp', '--max-eval-images', '2', '--calib-images', '3',
              '--cfg-options', f'train_dataloader.dataset.data_root={data}',
              f'test_dataloader.dataset.data_root={data}',
              f'test_evaluator.ann_file={data}annotations/instances_val2017.json']
    env = dict(os.environ, PATH=osp.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
               PORT=str(_free_port()), OMP_NUM_THREADS='1')
    one = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'ptq.py'), cfg, str(ckpt), '--work-dir',
                          str(tmp_path / 'one'), '--save-quantized', str(tmp_path / 'one.pth'), *common],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_ptq.sh'), cfg, '2', str(ckpt), '--work-dir',
                          str(tmp_path / 'two'), '--save-quantized', str(tmp_path / 'two.pth'), *common],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    _, meta1, s1 = read_quantized(str(tmp_path / 'one.pth'))
    _, meta2, s2 = read_quantized(str(tmp_path / 'two.pth'))
    assert meta1['calibration']['image_ids'] == meta2['calibration']['image_ids']
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    r1 = json.loads((tmp_path / 'one' / 'results.json').read_text())
    r2 = json.loads((tmp_path / 'two' / 'results.json').read_text())
    assert r1['metrics']['quantized'] == r2['metrics']['quantized']


def _reconstruct(rank, world, port, out):
    from mmvq.calibration import BlockReconstruction
    model, samples = _start(rank, world, port, 56)
    w4 = dict(type='UniformQuantizer', bits=4, symmetric=True, granularity='channel', ch_axis=0)
    mmvq.convert(model, dict(scope='backbone', roles=dict(weight=w4, act=A4)))
    stage = BlockReconstruction(iters=6, batch_size=3, units=['stages.0.*', 'patch_embed'])
    run_calibration(model, samples, lambda m, x: m(x), [stage])
    torch.save(model.state_dict(), f'{out}.{world}.{rank}.pth')
    if rank == 0:
        torch.save(dict(units=sorted(stage.report['units']),
                        changed=sum(u['flipped'] > 0 for u in stage.report['units'].values())),
                   f'{out}.{world}.report.pth')
    if world > 1:
        dist.destroy_process_group()


def test_two_process_block_reconstruction_matches_one_process(tmp_path):
    """Each rank records its share of the images; the records are gathered in
    image order and every rank optimises the same: weights equal bit for bit."""
    out = str(tmp_path / 'rc')
    mp.spawn(_reconstruct, args=(1, 0, out), nprocs=1, join=True)
    mp.spawn(_reconstruct, args=(2, _free_port(), out), nprocs=2, join=True)
    ref = torch.load(f'{out}.1.0.pth', weights_only=True)
    report = torch.load(f'{out}.1.report.pth', weights_only=True)
    units = report['units']
    assert report['changed'] >= 2          # roundings were learned, not left at nearest
    assert units == ['patch_embed', 'stages.0.blocks.0', 'stages.0.blocks.1', 'stages.0.downsample']
    for rank in (0, 1):
        sd = torch.load(f'{out}.2.{rank}.pth', weights_only=True)
        for k in ref:
            assert torch.equal(sd[k], ref[k]), f'rank {rank}: {k} differs'
