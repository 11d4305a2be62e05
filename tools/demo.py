"""Demo: quantize the tiny trained Swin Mask R-CNN with tools/ptq.py.

Needs no external data: generates the held-out "shapes" evaluation images (and a
few train images to calibrate on) deterministically, then runs ``tools/ptq.py``
on ``benchmarks/checkpoints/tiny_swin_mask_rcnn.pth`` for each method and
prints the FP vs quantized table (box/mask AP, calibration time, eval time and
peak memory vs FP). A few minutes on 2 CPU cores::

    python tools/demo.py                       # FQ-ViT W8A8/attn4, AdaLog W4A4, IGQ W4A4
    python tools/demo.py --methods uniform_w4a4 adalog_w4a4 --eval-images 200

It is ``benchmarks/run.py`` on a subset; the full table is ``python
benchmarks/run.py``.
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def main(argv=None):
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import run
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--methods', nargs='+', choices=run.METHODS,
                   default=['fqvit_w8a8_attn4', 'adalog_w4a4', 'igq_w4a4_g8'])
    p.add_argument('--eval-images', type=int, default=100)
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'))
    a = p.parse_args(argv)
    return run.main(['--models', 'det', '--methods', *a.methods, '--small-data', '16',
                     '--max-eval-images', str(a.eval_images), '--work-dir', a.work_dir])


if __name__ == '__main__':
    sys.exit(main())
