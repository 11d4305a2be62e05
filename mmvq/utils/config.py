"""Config helpers: read ``mmdet::``/``mmpretrain::``/``mmvq::`` paths like ``_base_`` does,
and find mmvq's own configs and tools (in a wheel: ``mmvq/.mim``; editable: the checkout)."""
import importlib.util
import os.path as osp

from mmengine.config import Config

SCOPE = 'mmvq'


def register_config_scope():
    """Let mmengine resolve ``mmvq::`` in ``_base_`` (e.g.
    ``'mmvq::_base_/quant/fqvit_w8a8_attn4.py'``) like ``mmdet::``.

    mmengine 0.x accepts a ``package::`` prefix only for the packages named in its
    ``mmengine.config.utils.MODULE2PACKAGE`` table (``PKG2PROJECT`` before 0.8) and
    has no API to add one; this adds ``mmvq`` to that table (idempotent, nothing else
    of mmengine is touched). It runs when ``mmvq`` is imported, so a config with
    ``mmvq::`` bases must be loaded after ``import mmvq``, as mmvq's tools do. mmengine
    then reads the file from the installed package's ``mmvq/.mim/configs`` (a wheel
    install; ``setup.py`` copies ``configs/`` there).
    """
    from mmengine.config import utils as cfg_utils
    for attr in ('MODULE2PACKAGE', 'PKG2PROJECT'):
        table = getattr(cfg_utils, attr, None)
        if isinstance(table, dict):
            table.setdefault(SCOPE, SCOPE)


def mim_root():
    """The folder that holds mmvq's ``configs/`` and ``tools/``.

    Returns:
        str: ``<site-packages>/mmvq/.mim`` for a wheel install, else the checkout
        root of an editable install.
    """
    pkg = osp.dirname(osp.dirname(osp.abspath(__file__)))
    for root in (osp.join(pkg, '.mim'), osp.dirname(pkg)):
        if osp.isdir(osp.join(root, 'configs', '_base_', 'quant')):
            return root
    raise FileNotFoundError(f'mmvq\'s configs are missing beside {pkg} (neither mmvq/.mim nor a '
                            'checkout): reinstall it with `pip install mmvq`')


def resolve_config_path(path):
    """Turn ``'mmdet::swin/x.py'`` into the file shipped in mmdet's wheel.

    mmengine resolves the ``package::`` prefix only inside ``_base_``; this
    lets users and tests pass such a path wherever a config file is expected.
    """
    if '::' not in path:
        return path
    package, rel = path.split('::', 1)
    if package == SCOPE:
        resolved = osp.join(mim_root(), 'configs', rel)
        if not osp.isfile(resolved):
            raise FileNotFoundError(f'{path}: no such config in mmvq ({resolved})')
        return resolved
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
