"""Smoke demo: quantize a Swin Mask R-CNN and compare it with the float model.

Runs with no external data: builds mmdet's Mask R-CNN Swin-T from its own
config (random weights, seeded: no checkpoint can be downloaded), draws a
synthetic image, calibrates W8A8 uniform quantizers (and, with
``--method fqvit``, PTF + integer LayerNorm + 4-bit Log-Int-Softmax) on a
second synthetic image, and prints FP vs quantized agreement. A trained tiny
detector replaces the random weights in a later release of the demo.

Usage:
    python tools/demo.py [--method uniform|fqvit] [--size 320]
"""
import argparse
import time

import numpy as np
import torch


def synthetic_image(seed, size):
    """Deterministic BGR uint8 image with textured rectangles and ellipses."""
    import cv2
    rng = np.random.default_rng(seed)
    h, w = size, int(size * 4 / 3)
    img = (rng.normal(110, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
        else:
            cv2.ellipse(img, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2),
                        0, 0, 360, color, -1)
    return img


def sqnr_db(ref, test):
    noise = (ref - test).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp(min=1e-30)))


METHODS = {
    'uniform': dict(
        scope='backbone',
        roles=dict(weight=dict(type='UniformQuantizer', bits=8, symmetric=True,
                               granularity='channel', ch_axis=0),
                   act=dict(type='UniformQuantizer', bits=8))),
    'fqvit': dict(
        scope='backbone',
        integer_layernorm=True,
        roles=dict(weight=dict(type='UniformQuantizer', bits=8, symmetric=True,
                               granularity='channel', ch_axis=0),
                   act=dict(type='UniformQuantizer', bits=8),
                   ln_input=dict(type='PTFQuantizer', bits=8),
                   ln_output=dict(type='UniformQuantizer', bits=8),
                   qkv_input=None, fc1_input=None, reduction_input=None,
                   attn_logits=dict(type='UniformQuantizer', bits=8),
                   softmax=dict(type='LogIntSoftmax', bits=4),
                   attn_probs=None)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--method', choices=sorted(METHODS), default='fqvit')
    parser.add_argument('--size', type=int, default=320, help='image height in pixels')
    args = parser.parse_args()

    import mmvq
    from mmdet.apis import inference_detector, init_detector
    from mmdet.utils import register_all_modules
    from mmvq.utils import load_config

    register_all_modules()
    cfg = load_config('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None
    cfg.test_dataloader.dataset.pipeline[1].scale = (args.size * 4 // 3, args.size)
    torch.manual_seed(0)
    model = init_detector(cfg, None, device='cpu')
    calib_img, test_img = synthetic_image(1, args.size), synthetic_image(2, args.size)

    feats = {}

    def grab(tag):
        def hook(_m, _i, out):
            feats[tag] = [o.detach().clone() for o in out]
        return hook

    handle = model.backbone.register_forward_hook(grab('fp'))
    with torch.no_grad():
        t0 = time.perf_counter()
        fp = inference_detector(model, test_img)
        t_fp = time.perf_counter() - t0
    handle.remove()

    mmvq.convert(model, METHODS[args.method])
    t0 = time.perf_counter()
    mmvq.calibrate(model, [calib_img], lambda m, img: inference_detector(m, img))
    t_cal = time.perf_counter() - t0

    handle = model.backbone.register_forward_hook(grab('q'))
    with torch.no_grad():
        t0 = time.perf_counter()
        q = inference_detector(model, test_img)
        t_q = time.perf_counter() - t0
    handle.remove()

    print(mmvq.format_summary(model).splitlines()[-1])
    print(f'\nmethod: {args.method}   image: synthetic {args.size}px   weights: random (seed 0)')
    print(f'{"backbone stage":<16}{"shape":<22}{"SQNR (dB)":>10}')
    for i, (a, b) in enumerate(zip(feats['fp'], feats['q'])):
        print(f'{"stage " + str(i):<16}{str(tuple(a.shape)):<22}{sqnr_db(a, b):>10.2f}')
    n_fp, n_q = len(fp.pred_instances), len(q.pred_instances)
    print(f'\n{"":<22}{"FP":>10}{"quantized":>12}')
    print(f'{"detections":<22}{n_fp:>10}{n_q:>12}')
    print(f'{"inference time (s)":<22}{t_fp:>10.2f}{t_q:>12.2f}')
    print(f'calibration time: {t_cal:.2f} s (1 image)')


if __name__ == '__main__':
    main()
