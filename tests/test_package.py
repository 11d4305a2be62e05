"""Package plumbing: registries, environment report, config helpers."""
import pytest
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS

import mmvq
from mmvq.registry import HOOKS, LOOPS, QUANT_WRAPPERS, QUANTIZERS, SEARCHES
from mmvq.utils import collect_env, load_config, resolve_config_path


def test_import_registers_every_quantizer_and_wrapper():
    import torch.nn as nn
    assert {'UniformQuantizer', 'PTFQuantizer', 'LogIntSoftmax', 'AdaLogQuantizer',
            'IGQQuantizer'} <= set(QUANTIZERS.module_dict)
    assert {'block_recon', 'fpcs', 'igq_allocation'} == set(SEARCHES.module_dict)
    assert HOOKS.parent is MMENGINE_HOOKS and HOOKS.scope == 'mmvq' and 'PTQHook' in HOOKS
    assert LOOPS.parent is MMENGINE_LOOPS and LOOPS.scope == 'mmvq' and 'PTQLoop' in LOOPS
    for cls in (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Softmax):
        assert cls in QUANT_WRAPPERS
    assert nn.ConvTranspose2d not in QUANT_WRAPPERS
    assert mmvq.__version__ == '0.1.0'


def test_collect_env_reports_stack_and_mmcv_ops():
    env = collect_env()
    assert env['mmcv'] == '2.1.0' and env['mmdet'] == '3.3.0'
    assert env['mmengine'] == '0.10.7' and env['mmpretrain'] == '1.2.0'
    assert env['mmcv ops'] == 'ok'
    assert env['pkg_resources'] == 'ok'


def test_package_config_paths():
    path = resolve_config_path('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    assert path.endswith('mmdet/.mim/configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    cfg = load_config('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    assert cfg.model.backbone.type == 'SwinTransformer'
    with pytest.raises(FileNotFoundError, match='no such config in mmdet'):
        resolve_config_path('mmdet::swin/nope.py')


def test_unknown_quantizer_type_is_a_clear_error():
    from mmvq.modules import build_quantizer
    with pytest.raises(KeyError, match="unknown quantizer type 'Nope'; registered: AdaLogQuantizer"):
        build_quantizer(dict(type='Nope'))
