# Tiny ViT classifier for the mmvq benchmark: mmpretrain's VisionTransformer
# (pre-norm blocks, class token, MultiheadAttention, FFN with GELU) with embed
# 96, 6 layers, 3 heads, patch 4 on the 28x28 images of Fashion-MNIST (Debian
# package dataset-fashion-mnist, laid out by benchmarks/fashion_mnist.py: first
# 20000 train images for training, first 2000 test images held out). Trained by benchmarks/train_tiny.py; the checkpoint is
# benchmarks/checkpoints/tiny_vit_cls.pth.
_base_ = ['mmpretrain::_base_/default_runtime.py']

data_root = 'data/fashion_mnist/'
num_classes = 10

model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=num_classes, mean=[72.9, 72.9, 72.9],
                           std=[90.0, 90.0, 90.0], to_rgb=True),
    backbone=dict(type='VisionTransformer',
                  arch=dict(embed_dims=96, num_layers=6, num_heads=3, feedforward_channels=384),
                  img_size=28, patch_size=4, drop_rate=0.0, drop_path_rate=0.1,
                  init_cfg=[dict(type='Kaiming', layer='Conv2d', mode='fan_in',
                                 nonlinearity='linear')]),
    neck=None,
    head=dict(type='VisionTransformerClsHead', num_classes=num_classes, in_channels=96,
              loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=128, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=100, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

max_epochs = 10
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                       custom_keys={'.cls_token': dict(decay_mult=0.0),
                                    '.pos_embed': dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5, by_epoch=True, begin=1,
         end=max_epochs),
]
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(interval=5, max_keep_ckpts=1))
randomness = dict(seed=0, deterministic=False)
auto_scale_lr = dict(enable=False)
