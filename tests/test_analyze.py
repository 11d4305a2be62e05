"""tools/analyze.py: sensitivity table (one row per quantized layer) and plots."""
import json
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, compose, tiny_config

PLOTS = ('ln_channel_ranges', 'post_softmax_hist', 'post_gelu_hist')


def check_plots(plots_dir):
    """Every plot decodes as a PNG and is not blank."""
    import matplotlib.image as mpimg
    for name in PLOTS:
        img = mpimg.imread(plots_dir / f'{name}.png')
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img[..., :3].std() > 0.05, f'{name}.png looks blank'


def check_sensitivity(wd):
    sens = json.loads((wd / 'sensitivity.json').read_text())
    rows = sens['layers']
    assert len({r['layer'] for r in rows}) == len(rows)
    sq = [r['sqnr_db'] for r in rows]
    assert sq == sorted(sq) and all(np.isfinite(sq))
    assert sens['total']['sqnr_db'] < min(sq) + 1e-6        # everything on is worst
    md = (wd / 'sensitivity.md').read_text()
    assert md.count('\n| ') == len(rows) + 1
    return rows


def analyze(cfg, wd, *extra):
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'analyze.py'), str(cfg),
                           '--work-dir', str(wd), *map(str, extra)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc


@pytest.mark.parametrize('block', ['fqvit_w8a8_attn4', 'adalog_w4a4'])
def test_analyze_tiny_vit(block, tmp_path):
    """mmpretrain's ViT hides its matmuls in SDPA unless a quantizer is active:
    the plots need the explicit attention even with every quantizer off."""
    data = osp.join(ROOT, 'tests', 'data', 'fashion_mnist_mini')
    wd = tmp_path / 'wd'
    analyze(tiny_config(tmp_path, 'tiny_vit_cls', block), wd,
            osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_vit_cls.pth'),
            '--analysis-images', 4, '--calib-images', 8, '--cfg-options',
            f'train_dataloader.dataset.data_root={data}', f'test_dataloader.dataset.data_root={data}')
    rows = check_sensitivity(wd)
    names = {r['layer'] for r in rows}
    # 6 blocks x (qkv, proj, fc1, fc2, ln1, ln2, and the matmuls' q/k/v/probs or
    # FQ-ViT's LIS softmax, its q/k/v being the qkv output) + patch embed + final
    # LayerNorm + the head (classifiers are quantized whole); FQ-ViT's token and
    # position embeddings sit on the backbone itself
    fq = block.startswith('fqvit')
    per_block = ['attn.qkv', 'attn.proj', 'ffn.layers.0.0', 'ffn.layers.1', 'ln1', 'ln2'] + (
        ['attn.softmax'] if fq else ['attn.matmul1', 'attn.matmul2'])
    expected = {f'backbone.layers.{i}.{n}' for i in range(6) for n in per_block}
    expected |= {'backbone.patch_embed.projection', 'backbone.ln1', 'head.layers.head'}
    if fq:
        expected.add('backbone')
    if block == 'adalog_w4a4':      # LayerNorms are float in AdaLog
        expected -= {n for n in expected if n.endswith(('ln1', 'ln2'))}
    assert names == expected, sorted(names ^ expected)
    check_plots(wd / 'plots')


def test_analyze_tiny_detector(tmp_path):
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import shapes
    data = tmp_path / 'shapes'
    shapes.ensure(str(data), n_train=2, n_val=2)
    wd = tmp_path / 'wd'
    root = f'{data}/'
    analyze(tiny_config(tmp_path, 'tiny_swin_mask_rcnn', 'fqvit_w8a8_attn4'), wd,
            osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_swin_mask_rcnn.pth'),
            '--analysis-images', 1, '--cfg-options', f'train_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'test_evaluator.ann_file={root}annotations/instances_val.json')
    rows = check_sensitivity(wd)
    # backbone only for a detector: depths [2, 2, 2, 2] -> 8 blocks x (qkv, proj, fc1,
    # fc2, norm1, norm2, softmax, and w_msa's q@k scores and bias table; FQ-ViT's q/k/v
    # are the qkv output, so the matmuls hold none) + patch embed conv + its norm + 3
    # PatchMerging (norm, reduction) + the 4 output norms
    assert len(rows) == 8 * 8 + 2 + 3 * 2 + 4
    assert sum(r['layer'].endswith('w_msa') for r in rows) == 8
    assert all(r['layer'].startswith('backbone.') for r in rows)
    check_plots(wd / 'plots')


def test_analyze_writes_table_and_plots(coco_mini, tmp_path):
    data = coco_mini + '/'
    wd = tmp_path / 'wd'
    analyze(compose(tmp_path, 'fqvit_w8a8_attn4'), wd, '--analysis-images', 1, '--cfg-options',
            f'train_dataloader.dataset.data_root={data}', f'test_dataloader.dataset.data_root={data}',
            f'test_evaluator.ann_file={data}annotations/instances_val2017.json')
    rows = check_sensitivity(wd)
    # Swin-T FQ-ViT layers owning quantizers: 51 Linear + 1 conv + 32 LayerNorm
    # + 12 x (softmax, w_msa's q@k scores and bias table); the matmuls hold none (q/k/v
    # are the qkv output, attn_probs=None: LIS does it)
    assert len(rows) == 51 + 1 + 32 + 12 * 2
    check_plots(wd / 'plots')
