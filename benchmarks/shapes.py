"""Deterministic synthetic data for the mmvq benchmark models ("shapes").

Drawn with numpy only (no antialiasing, no codecs beyond lossless PNG), so a
seed gives the same pixels on every machine. COCO-format instance
segmentation: each image holds 2-7 objects of
  five classes (disk, box, triangle, ring, cross) with random size, rotation,
  aspect, colour and texture (solid, stripes, checker, noise), composited in
  order on a textured background, so later objects occlude earlier ones.
  Annotations are the *visible* masks (COCO RLE), boxes are their extents;
  objects less than 40 % visible are dropped from the annotations (but stay in
  the image, as clutter).

Usage::

    python benchmarks/shapes.py data/shapes_det --train 1500 --val 200
"""
import argparse
import json
import os
import os.path as osp

import numpy as np

from _data import ensure_stamped, partial_dir, publish

SHAPES = ('disk', 'box', 'triangle', 'ring', 'cross')
TEXTURES = ('solid', 'stripes', 'checker', 'noise')


def shape_mask(kind, yy, xx, cy, cx, size, angle, aspect):
    """Boolean mask of one shape on the pixel grid (``size`` = outer radius)."""
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    if kind == 'disk':
        return (u / size) ** 2 + (v / (size * aspect)) ** 2 <= 1.0
    if kind == 'box':
        return (np.abs(u) <= size * 0.8) & (np.abs(v) <= size * 0.8 * aspect)
    if kind == 'triangle':
        # equilateral triangle inscribed in the circle of radius `size`
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + np.pi / 2 + k * 2 * np.pi / 3
            inside &= ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) <= size * 0.5
        return inside
    if kind == 'ring':
        r2 = (u / size) ** 2 + (v / size) ** 2
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2 / max(aspect, 0.7))
    if kind == 'cross':
        w = size * 0.32
        return ((np.abs(u) <= size) & (np.abs(v) <= w)) | ((np.abs(v) <= size) & (np.abs(u) <= w))
    raise ValueError(kind)


def texture(rng, kind, yy, xx, c1, c2):
    """HxWx3 float texture of two colours."""
    h, w = yy.shape
    if kind == 'solid':
        pat = np.ones((h, w), dtype=bool)
    elif kind == 'stripes':
        period = rng.uniform(4, 9)
        a = rng.uniform(0, np.pi)
        pat = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0
    elif kind == 'checker':
        cell = int(rng.integers(3, 7))
        pat = ((yy // cell + xx // cell) % 2).astype(bool)
    else:
        pat = rng.random((h, w)) > 0.5
    return np.where(pat[..., None], c1, c2)


def background(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    grad = rng.uniform(-60, 60, 3)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((xx * np.cos(a) + yy * np.sin(a)) / max(h, w))[..., None]
    img = base + grad * ramp + rng.normal(0, 12, (h, w, 3))
    return img, yy, xx


def _color(rng):
    return rng.uniform(0, 255, 3)


def _contrast_pair(rng):
    c1 = _color(rng)
    c2 = np.clip(c1 + rng.choice([-1, 1], 3) * rng.uniform(50, 110, 3), 0, 255)
    return c1, c2


def draw_det_image(rng, h, w, max_objects=7):
    img, yy, xx = background(rng, h, w)
    objs = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        kind = int(rng.integers(len(SHAPES)))
        size = rng.uniform(10, min(h, w) * 0.22)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        m = shape_mask(SHAPES[kind], yy, xx, cy, cx, size, rng.uniform(0, np.pi),
                       rng.uniform(0.6, 1.0))
        c1, c2 = _contrast_pair(rng)
        tex = texture(rng, TEXTURES[int(rng.integers(len(TEXTURES)))], yy, xx, c1, c2)
        img = np.where(m[..., None], tex + rng.normal(0, 6, (h, w, 3)), img)
        for o in objs:
            o['visible'] &= ~m
        objs.append(dict(label=kind, full=int(m.sum()), visible=m.copy()))
    return np.clip(img, 0, 255).astype(np.uint8), objs


def _save_png(path, img_rgb):
    from PIL import Image
    Image.fromarray(img_rgb).save(path, optimize=False)


def make_det(out, n_train, n_val, size=(192, 192), seed=0, min_visible=0.4):
    """Write ``out/{train,val}/*.png`` and ``out/annotations/instances_{split}.json``."""
    from pycocotools import mask as mask_utils
    tmp = partial_dir(out)
    os.makedirs(osp.join(tmp, 'annotations'))
    h, w = size
    cats = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(SHAPES)]
    for split, n, split_seed in (('train', n_train, seed), ('val', n_val, seed + 1_000_003)):
        rng = np.random.default_rng(split_seed)
        os.makedirs(osp.join(tmp, split))
        images, anns = [], []
        for i in range(n):
            img, objs = draw_det_image(rng, h, w)
            name = f'{i:06d}.png'
            _save_png(osp.join(tmp, split, name), img)
            images.append(dict(id=i + 1, file_name=name, height=h, width=w))
            for o in objs:
                vis = o['visible']
                area = int(vis.sum())
                if area < 30 or area < min_visible * o['full']:
                    continue
                ys, xs = np.nonzero(vis)
                x0, y0 = int(xs.min()), int(ys.min())
                bw, bh = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
                rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
                rle['counts'] = rle['counts'].decode('ascii')
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=o['label'] + 1,
                                 bbox=[x0, y0, bw, bh], area=area, iscrowd=0, segmentation=rle))
        with open(osp.join(tmp, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=anns, categories=cats,
                           info=dict(description=f'mmvq shapes det, seed {seed}')), f)
    publish(tmp, out)


def ensure(out, **kwargs):
    """Generate the dataset unless ``out`` already holds this exact one."""
    return ensure_stamped(out, dict(task='det', version=1, **kwargs),
                          lambda: make_det(out, **kwargs))


DET_DEFAULT = dict(n_train=1500, n_val=200, seed=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('out')
    p.add_argument('--train', type=int, default=None)
    p.add_argument('--val', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    d = dict(DET_DEFAULT)
    d.update({k: v for k, v in dict(n_train=a.train, n_val=a.val, seed=a.seed).items()
              if v is not None})
    ensure(a.out, **d)
    print(f'shapes dataset ready in {a.out} ({d})')


if __name__ == '__main__':
    main()
