"""Config helpers: read ``mmdet::``/``mmpretrain::`` paths like ``_base_`` does."""
import importlib.util
import os.path as osp

from mmengine.config import Config


def resolve_config_path(path):
    """Turn ``'mmdet::swin/x.py'`` into the file shipped in mmdet's wheel.

    mmengine resolves the ``package::`` prefix only inside ``_base_``; this
    lets users and tests pass such a path wherever a config file is expected.
    """
    if '::' not in path:
        return path
    package, rel = path.split('::', 1)
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f'{path}: package {package!r} is not installed '
                                f'(pip install {package})')
    resolved = osp.join(osp.dirname(spec.origin), '.mim', 'configs', rel)
    if not osp.isfile(resolved):
        raise FileNotFoundError(f'{path}: no such config in {package} ({resolved})')
    return resolved


def load_config(path):
    """``Config.fromfile`` that also accepts ``package::`` paths."""
    return Config.fromfile(resolve_config_path(path))
