"""Convert an official Swin detection checkpoint (mmdet 2.11 names) to mmdet 3.x.

Usage:
    python tools/convert_swin_det_ckpt.py SRC DST [--config CONFIG] [--trust-checkpoint]

With ``--config`` the converted weights are checked against the model that
config builds: missing/unexpected keys and shape mismatches are reported and
make the tool fail. The output holds only tensors and strings, so it loads
with ``torch.load(weights_only=True)``; it is written atomically.
"""
import argparse
import os.path as osp
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src')
    parser.add_argument('dst')
    parser.add_argument('--config', help='mmdet 3.x config to validate the keys against')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow full unpickling of SRC (only for files you trust)')
    args = parser.parse_args(argv)

    import torch

    from mmvq.utils.io import atomic_torch_save, file_sha256
    from mmvq.utils.swin_ckpt import convert_swin_det_state_dict

    if not osp.isfile(args.src):
        print(f'convert: error: {args.src} does not exist', file=sys.stderr)
        return 2
    try:
        ckpt = torch.load(args.src, map_location='cpu', weights_only=not args.trust_checkpoint)
    except Exception as exc:  # noqa: BLE001
        print(f'convert: error: cannot load {args.src} safely ({type(exc).__name__}); if you '
              'trust the file, add --trust-checkpoint', file=sys.stderr)
        return 2
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(hasattr(v, 'shape') for v in state.values()):
        print(f'convert: error: {args.src} holds no state dict', file=sys.stderr)
        return 2
    new_state, renamed = convert_swin_det_state_dict(state)
    print(f'{len(state)} tensors, {renamed} renamed')
    if args.config:
        from mmdet.utils import register_all_modules
        from mmengine.registry import MODELS

        from mmvq.utils import load_config
        register_all_modules()
        cfg = load_config(args.config)
        cfg.model.backbone.init_cfg = None
        target = MODELS.build(cfg.model).state_dict()
        missing = sorted(set(target) - set(new_state))
        unexpected = sorted(set(new_state) - set(target))
        shapes = [k for k in set(target) & set(new_state) if target[k].shape != new_state[k].shape]
        for title, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shapes)):
            if keys:
                print(f'{title} ({len(keys)}): {", ".join(keys[:10])}{" ..." if len(keys) > 10 else ""}')
        if missing or unexpected or shapes:
            print('convert: error: the converted keys do not match the config', file=sys.stderr)
            return 1
        print(f'all {len(target)} keys of {args.config} matched')
    atomic_torch_save(dict(state_dict=new_state,
                           meta=dict(converted_from=osp.basename(args.src),
                                     source_sha256=file_sha256(args.src),
                                     converter='mmvq tools/convert_swin_det_ckpt.py')), args.dst)
    print(f'written {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
