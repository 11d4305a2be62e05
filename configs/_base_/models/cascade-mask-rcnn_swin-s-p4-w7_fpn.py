# Cascade Mask R-CNN Swin-S: the Swin-T composition with depths [2,2,18,2] and
# the Swin-S ImageNet weights, as in the Swin detection release.
_base_ = './cascade-mask-rcnn_swin-t-p4-w7_fpn.py'

pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth'  # noqa
model = dict(
    backbone=dict(
        depths=[2, 2, 18, 2],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
