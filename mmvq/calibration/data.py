"""Calibration samples from the train split, never from the evaluation images."""
import copy

import torch
from mmengine.dataset import pseudo_collate
from mmengine.registry import DATASETS

WRAPPERS = ('RepeatDataset', 'ClassBalancedDataset', 'MultiImageMixDataset')


def _unwrap(ds_cfg):
    while isinstance(ds_cfg, dict) and str(ds_cfg.get('type', '')).split('.')[-1] in WRAPPERS:
        ds_cfg = ds_cfg['dataset']
    return ds_cfg


class CalibrationSamples:
    """``n`` images of ``split`` drawn with ``seed``, loaded with the test pipeline.

    Indexable; item ``p`` is a collated batch of one image, ready for
    ``model.test_step``.

    Args:
        cfg (Config): the full config (``{split}_dataloader`` and
            ``test_dataloader`` are read).
        n (int): number of images.
        seed (int): seed of the draw.
        split (str): ``'train'`` (default) or ``'val'``.
    """

    def __init__(self, cfg, n, seed=0, split='train'):
        key = f'{split}_dataloader'
        if cfg.get(key) is None:
            raise ValueError(f'the config has no {key}: calibration needs the {split} split '
                             f'(or choose another with --calib-split)')
        ds_cfg = copy.deepcopy(_unwrap(cfg[key]['dataset']))
        ds_cfg['pipeline'] = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
        ds_cfg['test_mode'] = True
        if 'filter_cfg' in ds_cfg:
            ds_cfg['filter_cfg'] = None
        self.dataset = DATASETS.build(ds_cfg)
        total = len(self.dataset)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f'--calib-images must be a positive integer, got {n}')
        if n > total:
            raise ValueError(f'--calib-images {n} is more than the {total} images of the '
                             f'{split} split: use at most {total}')
        g = torch.Generator(device='cpu').manual_seed(seed)
        self.indices = torch.randperm(total, generator=g, device='cpu')[:n].tolist()
        self.split = split
        self.seed = seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, pos):
        return pseudo_collate([self.dataset[self.indices[pos]]])

    def image_ids(self):
        out = []
        for i in self.indices:
            info = self.dataset.get_data_info(i)
            out.append(info.get('img_id', info.get('img_path', i)))
        return out
