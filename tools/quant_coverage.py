"""What each method quantizes: mmvq's quant summary of a real model, row by row
beside the official code's list.

    python tools/quant_coverage.py                 # print the tables
    python tools/quant_coverage.py --readme README.md   # rewrite README's section

The model is the shipped tiny mmpretrain ViT (``benchmarks/configs/
tiny_vit_cls.py``: patch embedding, class token, position embedding, 6
pre-norm blocks, final LayerNorm, linear head; no weights are needed to list
quantizers). Each block of ``configs/_base_/quant/`` converts it; the quant
summary (:func:`mmvq.quant_summary`) is collapsed over the layer index
(``layers.3`` -> ``layers.*``). :data:`REFERENCE` is the official code's list
for the same model, read from the sources named in each entry; a row marks
whether mmvq quantizes that tensor with the same quantizer kind, bits and
granularity, and mmvq quantizers the official code lacks are listed too.
``tests/test_coverage.py`` pins the lists.
"""
import argparse
import os.path as osp
import re
import sys
from collections import OrderedDict

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODEL_CFG = osp.join(ROOT, 'benchmarks', 'configs', 'tiny_vit_cls.py')
BLOCKS = OrderedDict([('fqvit_w8a8_attn4', 'FQ-ViT W8A8/Attn4'),
                      ('adalog_w4a4', 'AdaLog W4A4'), ('adalog_w3a3', 'AdaLog W3A3')])
L = 'backbone.layers.*'
# granularities as the summary writes them (its first word)
T, C, H, P = 'tensor', 'channel(axis=0)', 'head', 'tensor+pow2(channel)'


def _fqvit():
    """megvii-research/FQ-ViT ``models/vit_quant.py`` (DeiT: ``input_quant=True``),
    ``models/layers_quant.py`` (PatchEmbed, Mlp), ``config.py`` (uint8 layer-wise
    activations, int8 channel-wise weights, PTF for the ``*_LN`` quantizers, uint4
    log2 for LIS)."""
    return [
        ('qact_input (image)', 'backbone.patch_embed.projection', 'input', 'uniform', 8, T),
        ('patch_embed.proj weight', 'backbone.patch_embed.projection', 'weight', 'uniform', 8, C),
        ('patch_embed.qact', 'backbone.patch_embed.projection', 'output', 'uniform', 8, T),
        ('qact_embed (after the class-token concat)', 'backbone', 'embed', 'uniform', 8, T),
        ('qact_pos (position embedding)', 'backbone', 'pos', 'uniform', 8, T),
        ('qact1 / blocks[i-1].qact4 (stream into norm1 and the skip)', f'{L}.ln1', 'input+skip',
         'ptf', 8, P),
        ('blocks.*.qact1 (norm1 output)', f'{L}.ln1', 'output', 'uniform', 8, T),
        ('attn.qkv weight', f'{L}.attn.qkv', 'weight', 'uniform', 8, C),
        ('attn.qact1 (whole qkv output)', f'{L}.attn.qkv', 'output', 'uniform', 8, T),
        ('attn.qact_attn1 (logits)', f'{L}.attn.softmax', 'input', 'uniform', 8, T),
        ('attn.log_int_softmax', f'{L}.attn.softmax', 'lis', 'lis', 4, T),
        ('attn.qact2 (attn @ v)', f'{L}.attn.proj', 'input', 'uniform', 8, T),
        ('attn.proj weight', f'{L}.attn.proj', 'weight', 'uniform', 8, C),
        ('attn.qact3 (proj output)', f'{L}.attn.proj', 'output', 'uniform', 8, T),
        ('blocks.*.qact2 (stream into norm2 and the skip)', f'{L}.ln2', 'input+skip', 'ptf', 8,
         P),
        ('blocks.*.qact3 (norm2 output)', f'{L}.ln2', 'output', 'uniform', 8, T),
        ('mlp.fc1 weight', f'{L}.ffn.layers.0.0', 'weight', 'uniform', 8, C),
        ('mlp.qact1 (GELU output)', f'{L}.ffn.layers.1', 'input', 'uniform', 8, T),
        ('mlp.fc2 weight', f'{L}.ffn.layers.1', 'weight', 'uniform', 8, C),
        ('mlp.qact2 (fc2 output)', f'{L}.ffn.layers.1', 'output', 'uniform', 8, T),
        ('blocks[-1].qact4 (stream into the final norm)', 'backbone.ln1', 'input', 'ptf', 8, P),
        ('qact2 (final norm output, class token)', 'backbone.ln1', 'output', 'uniform', 8, T),
        ('head weight', 'head.layers.head', 'weight', 'uniform', 8, C),
        ('act_out (logits)', 'head.layers.head', 'output', 'uniform', 8, T),
    ]


def _adalog(b):
    """GoatWu/AdaLog ``utils/wrap_net.py`` (every Conv2d / Linear / MatMul of a timm
    ViT), ``quant_layers/{conv,linear,matmul}.py``, ``configs/{b}bit.py``
    (``qconv_a_bit=8``: the patch-embedding input is returned unquantized;
    ``qhead_a_bit=b``; ``matmul_head_channel_wise``; AdaLog after softmax and
    GELU)."""
    return [
        ('patch_embed.proj weight', 'backbone.patch_embed.projection', 'weight', 'uniform', b, C),
        ('attn.qkv input', f'{L}.attn.qkv', 'input', 'uniform', b, T),
        ('attn.qkv weight', f'{L}.attn.qkv', 'weight', 'uniform', b, C),
        ('attn.matmul1 A (q, per head)', f'{L}.attn.matmul1', 'a', 'uniform', b, H),
        ('attn.matmul1 B (k^T, per head)', f'{L}.attn.matmul1', 'b', 'uniform', b, H),
        ('attn.matmul2 A (post-softmax)', f'{L}.attn.matmul2', 'a', 'adalog', b, T),
        ('attn.matmul2 B (v, per head)', f'{L}.attn.matmul2', 'b', 'uniform', b, H),
        ('attn.proj input', f'{L}.attn.proj', 'input', 'uniform', b, T),
        ('attn.proj weight', f'{L}.attn.proj', 'weight', 'uniform', b, C),
        ('mlp.fc1 input', f'{L}.ffn.layers.0.0', 'input', 'uniform', b, T),
        ('mlp.fc1 weight', f'{L}.ffn.layers.0.0', 'weight', 'uniform', b, C),
        ('mlp.fc2 input (post-GELU, shifted)', f'{L}.ffn.layers.1', 'input', 'adalog+shift', b,
         T),
        ('mlp.fc2 weight', f'{L}.ffn.layers.1', 'weight', 'uniform', b, C),
        ('head input', 'head.layers.head', 'input', 'uniform', b, T),
        ('head weight', 'head.layers.head', 'weight', 'uniform', b, C),
    ]


REFERENCE = {'fqvit_w8a8_attn4': _fqvit(), 'adalog_w4a4': _adalog(4), 'adalog_w3a3': _adalog(3)}
SOURCES = {'fqvit_w8a8_attn4': _fqvit.__doc__, 'adalog_w4a4': _adalog.__doc__,
           'adalog_w3a3': _adalog.__doc__}


def build_model():
    """The tiny ViT classifier (random weights: the quantizer list needs none)."""
    import torch
    from mmengine.registry import DefaultScope

    from mmvq.utils import load_config
    import mmpretrain.utils
    from mmpretrain.registry import MODELS
    mmpretrain.utils.register_all_modules(init_default_scope=False)
    cfg = load_config(MODEL_CFG)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    return model.eval()


def mmvq_rows(block):
    """Collapsed quant summary of the tiny ViT under ``block``:
    ``{(module, slot): (kind, bits, granularity)}``."""
    import mmvq
    from mmvq.utils import load_config
    model = build_model()
    qcfg = load_config(osp.join(ROOT, 'configs', '_base_', 'quant', f'{block}.py')).quant
    mmvq.convert(model, qcfg.to_dict())
    rows = OrderedDict()
    for r in mmvq.quant_summary(model):
        if not r['enabled']:
            continue
        key = (re.sub(r'layers\.\d+\.', 'layers.*.', r['module'], count=1), r['slot'])
        rows[key] = (r['kind'], r['bits'], str(r['granularity']).split(' ')[0])
    return rows


def compare(block):
    """``(table_rows, missing, extra)``: each reference row with mmvq's quantizer,
    reference rows mmvq lacks or quantizes otherwise, mmvq rows not referenced."""
    ours = mmvq_rows(block)
    table, missing, seen = [], [], set()
    for official, module, slot, kind, bits, gran in REFERENCE[block]:
        got = ours.get((module, slot))
        seen.add((module, slot))
        ok = got == (kind, bits, gran)
        if not ok:
            missing.append((official, module, slot, (kind, bits, gran), got))
        table.append((official, f'{kind} {bits}b {gran}', f'{module} [{slot}]',
                      '-' if got is None else f'{got[0]} {got[1]}b {got[2]}', ok))
    extra = [(k, v) for k, v in ours.items() if k not in seen]
    return table, missing, extra


def markdown():
    out = []
    for block, title in BLOCKS.items():
        table, missing, extra = compare(block)
        src = ' '.join(SOURCES[block].split())
        out += [f'**{title}** (`configs/_base_/quant/{block}.py`) — official: {src}', '',
                '| official tensor | official | mmvq quantizer | mmvq | same |',
                '|---|---|---|---|:-:|']
        out += [f'| {a} | {b} | `{c}` | {d} | {"✓" if ok else "✗"} |' for a, b, c, d, ok in table]
        out += [f'| (not in the official code) | - | `{m} [{s}]` | {k} {b}b {g} | ✗ |'
                for (m, s), (k, b, g) in extra]
        out.append('')
    return '\n'.join(out)


BEGIN = '<!-- quant-coverage:begin (tools/quant_coverage.py) -->'
END = '<!-- quant-coverage:end -->'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--readme', help='rewrite the section between the coverage markers')
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    text = markdown()
    if not args.readme:
        print(text)
        return 0
    with open(args.readme) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f'{args.readme} has no coverage markers: add the lines {BEGIN!r} '
                         f'and {END!r} where the tables go')
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = f'{head}{BEGIN}\n{text}\n{END}{tail}'
    tmp = args.readme + '.tmp'
    with open(tmp, 'w') as f:
        f.write(new)
    import os
    os.replace(tmp, args.readme)
    print(f'wrote the coverage tables into {args.readme}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
