"""Calibration samples (from the train split, never from the evaluation
images) and seeded evaluation subsets; how many images is the schema's
(:func:`mmvq.schema.calib_images_for`)."""
import copy

import torch
from mmengine.dataset import pseudo_collate
from mmengine.registry import DATASETS

from ..schema import CLI_SOURCE, check_calib_images

WRAPPERS = ('RepeatDataset', 'ClassBalancedDataset', 'MultiImageMixDataset')

def _unwrap(ds_cfg):
    while isinstance(ds_cfg, dict) and str(ds_cfg.get('type', '')).split('.')[-1] in WRAPPERS:
        ds_cfg = ds_cfg['dataset']
    return ds_cfg


class CalibrationSamples:
    """``n`` images of ``split`` drawn with ``seed``, loaded with the test pipeline.

    Indexable; item ``p`` is a collated batch of one image, ready for
    ``model.test_step``. Only the split's *dataset* config is used (its
    dataloader's sampler, batch size and workers, and any ``train_cfg`` or
    ``optim_wrapper``, are not needed).

    Args:
        loader_cfg (dict): the split's dataloader config (``dataset`` is read).
        pipeline (list): the test pipeline the images are loaded with.
        n (int): number of images.
        seed (int): seed of the draw.
        split (str): name of the split, for messages and reports.
        source (str | None): where ``n`` came from
            (:func:`mmvq.schema.calib_images_for`). A protocol's number (any
            source but the user's ``--calib-images``) larger than the split
            uses the split whole (:attr:`capped_from` records the number asked
            for) instead of being an error; :attr:`source` then says so.
    """

    def __init__(self, loader_cfg, pipeline, n, seed=0, split='train', source=None):
        ds_cfg = copy.deepcopy(_unwrap(loader_cfg['dataset']))
        ds_cfg['pipeline'] = copy.deepcopy(pipeline)
        ds_cfg['test_mode'] = True
        if 'filter_cfg' in ds_cfg:
            ds_cfg['filter_cfg'] = None
        self.dataset = DATASETS.build(ds_cfg)
        total = len(self.dataset)
        check_calib_images(n)
        self.capped_from = None
        if n > total and source not in (None, CLI_SOURCE):
            self.capped_from, n = n, total
        if n > total:
            raise ValueError(f'--calib-images {n} is more than the {total} images of the '
                             f'{split} split: use at most {total}')
        g = torch.Generator(device='cpu').manual_seed(seed)
        self.indices = torch.randperm(total, generator=g, device='cpu')[:n].tolist()
        self.split = split
        self.seed = seed
        self.source = source if self.capped_from is None else (
            f'{source} asks for {self.capped_from}; the {split} split holds {n}, all used')

    @classmethod
    def from_config(cls, cfg, n, seed=0, split='train', source=None):
        """Draw from ``cfg[f'{split}_dataloader']`` with ``cfg``'s test pipeline."""
        loader = cfg.get(f'{split}_dataloader')
        if loader is None:
            raise ValueError(missing_split_message(split, config_splits(cfg)))
        return cls(loader, cfg.test_dataloader.dataset.pipeline, n, seed, split, source)

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


def missing_split_message(split, available=()):
    """One line for a config without the dataloader calibration draws from.

    Args:
        split (str): the split asked for.
        available (Sequence[str]): splits the config does have a dataloader for.
    """
    others = [s for s in available if s != split]
    alt = (f'calibrate on a split the config has with --calib-split {others[0]}' if others else
           'there is no other split to calibrate on')
    if split == 'train':
        return ('the config has no train_dataloader to draw calibration images from: add one '
                '(its dataset is enough, no train_cfg/optim_wrapper needed) or ' + alt)
    return f'the config has no {split}_dataloader to draw calibration images from: add one or {alt}'


def config_splits(cfg):
    """Splits with a dataloader in ``cfg`` (``train``, ``val``, ``test``)."""
    return [s for s in ('train', 'val', 'test') if cfg.get(f'{s}_dataloader') is not None]


def spread_subset(total, n, seed=0):
    """``n`` of ``total`` indices drawn with ``seed``, in dataset order.

    Evaluating the *first* ``n`` images of a folder dataset sorted by class
    measures one class; a seeded draw spreads over the whole set.
    """
    if n >= total:
        return list(range(total))
    g = torch.Generator(device='cpu').manual_seed(seed)
    return sorted(torch.randperm(total, generator=g, device='cpu')[:n].tolist())
