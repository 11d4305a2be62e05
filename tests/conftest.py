"""Shared fixtures: paths to ../shared data and the OpenMMLab scope set-up."""
import os.path as osp
import warnings

import pytest

from helpers import COCO_MINI

warnings.filterwarnings('ignore', message='.*pkg_resources is deprecated.*')


def coco_mini_or_skip():
    """Return the coco_mini root, or skip the test with the reason."""
    ann = osp.join(COCO_MINI, 'annotations', 'instances_val2017.json')
    if not osp.isfile(ann):
        pytest.skip(f'needs ../shared/data/coco_mini (not found at {COCO_MINI}); '
                    'CI always has it, set MMVQ_SHARED to point elsewhere')
    return COCO_MINI


@pytest.fixture(scope='session')
def coco_mini():
    return coco_mini_or_skip()


@pytest.fixture(scope='session')
def coco_image(coco_mini):
    """One real COCO val2017 image (id 74646)."""
    return osp.join(coco_mini, 'val2017', '000000074646.jpg')


@pytest.fixture(autouse=True, scope='session')
def _register_openmmlab():
    import mmdet.utils

    import mmvq  # noqa: F401  (registers every mmvq type)
    mmdet.utils.register_all_modules(init_default_scope=True)
