"""Official Swin detection checkpoint naming -> mmdet 3.x (tools/convert_swin_det_ckpt.py)."""
import os.path as osp
import re
import subprocess
import sys

import torch
import torch.nn.functional as F

from helpers import CONFIGS, ROOT
from mmvq.utils.swin_ckpt import convert_swin_det_state_dict


def original_swin_merging(x, hw, norm_w, norm_b, red_w):
    """The original Swin PatchMerging: block-wise concat of the 4 positions."""
    B, L, C = x.shape
    H, W = hw
    x = x.view(B, H, W, C)
    x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
    x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
    x = torch.cat([x0, x1, x2, x3], -1).view(B, -1, 4 * C)
    x = F.layer_norm(x, (4 * C, ), norm_w, norm_b)
    return F.linear(x, red_w)


def test_patch_merging_reorder_matches_original_computation():
    from mmdet.models.layers import PatchMerging
    torch.manual_seed(0)
    C, H, W = 8, 6, 10
    merge = PatchMerging(in_channels=C, out_channels=2 * C)
    orig = {'backbone.layers.0.downsample.norm.weight': torch.randn(4 * C),
            'backbone.layers.0.downsample.norm.bias': torch.randn(4 * C),
            'backbone.layers.0.downsample.reduction.weight': torch.randn(2 * C, 4 * C)}
    new, renamed = convert_swin_det_state_dict(orig)
    assert renamed == 3
    merge.load_state_dict({k.replace('backbone.stages.0.downsample.', ''): v for k, v in new.items()})
    x = torch.randn(2, H * W, C)
    out, out_hw = merge(x, (H, W))
    ref = original_swin_merging(x, (H, W), *orig.values())
    assert out_hw == (H // 2, W // 2)
    assert torch.allclose(out, ref, atol=1e-5)


def to_original_naming(state):
    """mmdet 3.x -> original naming, written independently of the converter."""
    out = {}
    for key, v in state.items():
        if key.startswith('backbone.'):
            k = key[len('backbone.'):]
            k = k.replace('patch_embed.projection.', 'patch_embed.proj.')
            k = re.sub(r'^stages\.', 'layers.', k)
            k = k.replace('.attn.w_msa.', '.attn.').replace('.ffn.layers.0.0.', '.mlp.fc1.')
            k = k.replace('.ffn.layers.1.', '.mlp.fc2.')
            if re.search(r'downsample\.(norm|reduction)\.', k):
                dim = 1 if 'reduction' in k else 0
                c = v.shape[dim] // 4
                old = torch.empty_like(v)
                for b, o in enumerate((0, 2, 1, 3)):   # original block b sits at unfold offset o
                    idx_new = torch.arange(c) * 4 + o
                    idx_old = b * c + torch.arange(c)
                    old.index_copy_(dim, idx_old, v.index_select(dim, idx_new))
                v = old
            key = 'backbone.' + k
        out[key] = v
    return out


def _model_state(path):
    from mmengine.registry import MODELS

    from mmvq.utils import load_config
    cfg = load_config(path)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    return MODELS.build(cfg.model).state_dict()


def test_full_detectors_round_trip():
    for path in ('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
                 osp.join(CONFIGS, '_base_/models/cascade-mask-rcnn_swin-s-p4-w7_fpn.py')):
        target = _model_state(path)
        orig = to_original_naming(target)
        assert 'backbone.layers.0.blocks.0.attn.relative_position_bias_table' in orig
        assert 'backbone.layers.2.downsample.reduction.weight' in orig
        new, _ = convert_swin_det_state_dict(orig)
        assert set(new) == set(target)
        for k in target:
            assert new[k].shape == target[k].shape, k
            assert torch.equal(new[k], target[k]), k


def test_convert_tool_cli(tmp_path):
    path = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'
    orig = to_original_naming(_model_state(path))
    src, dst = tmp_path / 'orig.pth', tmp_path / 'conv.pth'
    torch.save({'state_dict': orig, 'meta': {'mmdet_version': '2.11.0'}}, src)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'convert_swin_det_ckpt.py'),
                           str(src), str(dst), '--config', path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'keys of' in proc.stdout and 'matched' in proc.stdout
    conv = torch.load(dst, weights_only=True)
    assert conv['meta']['converted_from'] == 'orig.pth'
    assert 'backbone.stages.0.blocks.0.ffn.layers.1.weight' in conv['state_dict']
    # a checkpoint of another architecture is reported and fails
    bad = dict(orig)
    bad.pop('backbone.layers.0.blocks.0.mlp.fc1.weight')
    torch.save({'state_dict': bad}, src)
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'convert_swin_det_ckpt.py'),
                           str(src), str(dst) + '2', '--config', path], capture_output=True, text=True)
    assert proc.returncode == 1 and 'missing (1)' in proc.stdout
    assert not osp.exists(str(dst) + '2')
