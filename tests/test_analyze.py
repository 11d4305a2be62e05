"""tools/analyze.py: sensitivity table (one row per quantized layer) and plots."""
import json
import os.path as osp
import subprocess
import sys

import numpy as np

from conftest import ROOT
from test_ptq_tool import compose


def test_analyze_writes_table_and_plots(coco_mini, tmp_path):
    cfg = compose(tmp_path, 'fqvit_w8a8_attn4')
    data = coco_mini + '/'
    wd = tmp_path / 'wd'
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'analyze.py'), cfg, '--work-dir', str(wd),
         '--analysis-images', '1', '--cfg-options', f'train_dataloader.dataset.data_root={data}',
         f'test_dataloader.dataset.data_root={data}',
         f'test_evaluator.ann_file={data}annotations/instances_val2017.json'],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sens = json.loads((wd / 'sensitivity.json').read_text())
    rows = sens['layers']
    # Swin-T FQ-ViT layers owning quantizers: 51 Linear + 1 conv + 32 LayerNorm
    # + 12 x (matmul1, softmax) (matmul2 has no quantizer: attn_probs=None, LIS does it)
    assert len(rows) == 51 + 1 + 32 + 12 * 2 + 12
    assert len({r['layer'] for r in rows}) == len(rows)
    sq = [r['sqnr_db'] for r in rows]
    assert sq == sorted(sq) and all(np.isfinite(sq))
    assert sens['total']['sqnr_db'] < min(sq) + 1e-6        # everything on is worst
    md = (wd / 'sensitivity.md').read_text()
    assert md.count('\n| ') == len(rows) + 1
    import matplotlib.image as mpimg
    for name in ('ln_channel_ranges', 'post_softmax_hist', 'post_gelu_hist'):
        img = mpimg.imread(wd / 'plots' / f'{name}.png')
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img[..., :3].std() > 0.05, f'{name}.png looks blank'
