"""What each method quantizes, pinned to the official code's list, and the
mechanics of FQ-ViT's full coverage (residual stream, embeddings, class token)."""
import os.path as osp
import sys

import pytest
import torch

import mmvq

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
import quant_coverage  # noqa: E402


@pytest.mark.parametrize('block', list(quant_coverage.BLOCKS))
def test_quantized_tensors_are_the_official_list(block):
    """Names, quantizer kind, bits and granularity: every tensor the official
    pipeline quantizes, nothing else (the README table is generated from this)."""
    table, missing, extra = quant_coverage.compare(block)
    assert not missing, f'{block}: quantized otherwise than the reference: {missing}'
    assert not extra, f'{block}: quantizers the reference does not have: {extra}'
    assert len(table) == len(quant_coverage.REFERENCE[block])


def test_readme_table_is_generated():
    readme = open(osp.join(quant_coverage.ROOT, 'README.md')).read()
    section = readme.split(quant_coverage.BEGIN, 1)[1].split(quant_coverage.END, 1)[0]
    assert section.strip() == quant_coverage.markdown().strip(), \
        'README coverage tables are stale: run python tools/quant_coverage.py --readme README.md'


def _fqvit_model():
    from mmvq.utils import load_config
    model = quant_coverage.build_model()
    qcfg = load_config(osp.join(quant_coverage.ROOT, 'configs/_base_/quant/fqvit_w8a8_attn4.py'))
    return model, qcfg.quant.to_dict()


def test_residual_stream_feeds_the_skip_connection():
    """FQ-ViT: x = q2(x + attn(norm1(x))) feeds norm2 *and* the skip; with
    every quantizer off the block is its float self, bit for bit."""
    model, qcfg = _fqvit_model()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        ref = model(x, mode='tensor')
    mmvq.convert(model, qcfg)
    layer = model.backbone.layers[2]
    assert type(layer).__name__ == 'QuantResidualBlock'
    assert layer.ln1.stream_input and layer.ln2.stream_input
    mmvq.calibrate(model, [x], lambda m, b: m(b, mode='tensor'))
    feats = {}
    h = layer.register_forward_hook(lambda m, i, o: feats.update(inp=i[0], out=o))
    with torch.no_grad():
        model(x, mode='tensor')
    h.remove()
    with torch.no_grad():                        # the definition, written out
        s = layer.ln1.input_quantizer(feats['inp'])
        s = s + layer.attn(layer.ln1(s))
        s = layer.ln2.input_quantizer(s)
        want = layer.ffn(layer.ln2(s), identity=s)
    torch.testing.assert_close(feats['out'], want, rtol=0, atol=0)
    # the stream really is on the PTF grid: quantizing it again changes nothing
    torch.testing.assert_close(layer.ln2.input_quantizer(s), s, rtol=0, atol=1e-6)
    mmvq.enable_quantizers(model, False)
    with torch.no_grad():
        assert torch.equal(model(x, mode='tensor'), ref)


def test_embeddings_and_class_token_quantizers():
    model, qcfg = _fqvit_model()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 28, 28)
    mmvq.convert(model, qcfg)
    bb = model.backbone
    assert type(bb).__name__ == 'QuantVisionTransformer'
    ln_out = {}
    hl = bb.ln1.register_forward_hook(lambda m, i, o: ln_out.update(y=o))
    mmvq.calibrate(model, [x], lambda m, b: m(b, mode='tensor'))
    hl.remove()
    # the final LayerNorm's output quantizer saw the class token only (qact2)
    y = ln_out['y']
    oq = bb.ln1.output_quantizer
    lo, hi = y[:, 0].min().clamp(max=0), y[:, 0].max().clamp(min=0)
    torch.testing.assert_close(oq.scale, ((hi - lo) / 255).reshape(1))
    # the pos quantizer holds the position embedding's range
    pos = bb.pos_embed.detach()
    torch.testing.assert_close(bb.pos_quantizer.scale,
                               ((pos.max() - pos.min().clamp(max=0)) / 255).reshape(1))
    # quantized: the first block's input is cat(cls, patches) quantized, plus the
    # quantized position embedding
    tokens = {}
    hk = bb.layers[0].register_forward_pre_hook(lambda m, i: tokens.update(x=i[0]))
    with torch.no_grad():
        model(x, mode='tensor')
        patches, _ = bb.patch_embed(x)
        want = bb.embed_quantizer(torch.cat((bb.cls_token.expand(3, -1, -1), patches), 1)) \
            + bb.pos_quantizer(bb.pos_embed)
    hk.remove()
    torch.testing.assert_close(tokens['x'], want, rtol=0, atol=0)


def test_swin_scores_and_bias_table_are_quantized():
    """Swin (FQ-ViT ``swin_quant.py``): q @ k^T (qact_attn1) and the bias table
    (qact_table) quantized; every block a residual block."""
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    from helpers import classifier_from as build
    model = build('mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py')
    _, qcfg = _fqvit_model()
    mmvq.convert(model, qcfg)
    rows = mmvq.quant_summary(model)
    slots = {(r['module'].split('.')[-1], r['slot']) for r in rows}
    assert ('w_msa', 'scores') in slots and ('w_msa', 'table') in slots
    n_blocks = sum(type(m).__name__ == 'QuantResidualBlock' for m in model.modules())
    assert n_blocks == 12
    # Swin's patch embedding has a LayerNorm: its input (PTF) covers the conv output
    pe = [r for r in rows if r['module'] == 'backbone.patch_embed.projection']
    assert {r['slot'] for r in pe} == {'input', 'weight'}
