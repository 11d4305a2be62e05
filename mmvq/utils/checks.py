"""Input checks for the command-line tools: one-line errors that name the fix."""
import json
import os
import os.path as osp
import tempfile


class UserInputError(ValueError):
    """Bad input from the user; the tools print it as one line and exit 2."""


def check_config_path(path):
    if not osp.isfile(path):
        raise UserInputError(f'config {path} does not exist: pass the path of an mmdet/mmpretrain '
                             'Python config')
    if not path.endswith('.py'):
        raise UserInputError(f'config {path} is not a Python config (.py): mmvq reads mmengine '
                             'Python configs')


def load_state_dict(path, trust=False):
    """Read a float checkpoint's state dict, refusing unsafe pickles unless trusted."""
    import torch
    if not osp.isfile(path):
        raise UserInputError(f'checkpoint {path} does not exist: check the path')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=not trust)
    except Exception as exc:  # noqa: BLE001
        if not trust and 'weights_only' in str(exc):
            raise UserInputError(f'checkpoint {path} holds pickled Python objects besides tensors: '
                                 'if you trust the file, add --trust-checkpoint') from None
        raise UserInputError(f'{path} is not a readable PyTorch checkpoint '
                             f'({type(exc).__name__}): pass a .pth saved by torch.save') from None
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(hasattr(v, 'shape') for v in state.values()):
        raise UserInputError(f'{path} holds no state dict of tensors: pass a model checkpoint')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


def check_state_dict_fits(state, model, path):
    """Raise when a checkpoint is for another architecture (key/shape counts)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        example = (missing + unexpected + shapes)[:2]
        raise UserInputError(
            f'checkpoint {path} does not fit the config\'s model: {len(missing)} missing, '
            f'{len(unexpected)} unexpected and {len(shapes)} mis-shaped keys (e.g. {example}); '
            'pass the checkpoint trained with this config (official Swin detection files: '
            'convert them with tools/convert_swin_det_ckpt.py)')


def _dataset_cfg(loader_cfg):
    ds = loader_cfg.get('dataset', {})
    while isinstance(ds, dict) and 'dataset' in ds and 'ann_file' not in ds:
        ds = ds['dataset']
    return ds


def check_dataset(cfg, key):
    """Data root and annotation file of ``cfg[key]`` exist and read as JSON."""
    loader = cfg.get(key)
    if loader is None:
        return
    ds = _dataset_cfg(loader)
    root = ds.get('data_root') or ''
    if root and not osp.isdir(root):
        raise UserInputError(f'data root {root} of {key} does not exist: set it with '
                             f'--cfg-options {key}.dataset.data_root=/path/to/data/')
    ann = ds.get('ann_file')
    if ann:
        path = ann if osp.isabs(ann) else osp.join(root, ann)
        if not osp.isfile(path):
            raise UserInputError(f'annotation file {path} of {key} does not exist: fix '
                                 f'{key}.dataset.ann_file or data_root with --cfg-options')
        if path.endswith('.json'):
            try:
                with open(path) as f:
                    json.load(f)
            except (OSError, ValueError) as exc:
                raise UserInputError(f'annotation file {path} is not readable JSON '
                                     f'({type(exc).__name__}): re-download or fix it') from None


def check_work_dir(path):
    """Create the work dir and prove it is writable (root ignores mode bits)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix='.mmvq-write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UserInputError(f'work dir {path} is not writable ({exc.strerror or type(exc).__name__}): '
                             'pass a writable --work-dir') from None
