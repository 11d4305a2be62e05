# Mask R-CNN Swin-T (mmdet's own config) on ../shared/data/coco_mini, used by the
# end-to-end tests: its 10 val2017 images stand in for both the "train" split
# (calibration) and the evaluation split. Images are resized to 512x320 to keep
# CPU tests fast; the R-CNN score threshold is 0 so random weights still
# produce detections for the COCO metric.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']

data_root = '../shared/data/coco_mini/'
model = dict(backbone=dict(init_cfg=None), test_cfg=dict(rcnn=dict(score_thr=0.0)))
_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 320), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
_dataset = dict(type='CocoDataset', data_root=data_root,
                ann_file='annotations/instances_val2017.json',
                data_prefix=dict(img='val2017/'), test_mode=True, pipeline=_test_pipeline)
train_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                        dataset=dict(_delete_=True, **_dataset))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(_delete_=True, **_dataset))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
default_hooks = dict(logger=dict(interval=50))
