"""The quantization block's schema and the plan it resolves to on a model."""
import pytest

import mmvq
from helpers import tiny_vit
from mmvq.schema import (apply_override, calib_images_for, calib_settings, chain_lookup,
                         resolve_role, scope_for_task, validate_qcfg, MISSING)

U8 = dict(type='UniformQuantizer', bits=8)
U4 = dict(type='UniformQuantizer', bits=4)
LOG = dict(type='AdaLogQuantizer', bits=4, fixed_scale=1.0)


def test_roles_fall_back_along_the_chain():
    roles = dict(act=U8, linear_input=U4)
    assert resolve_role(roles, 'fc2_input') == U4          # fc2_input -> linear_input
    assert resolve_role(roles, 'q') == U8                  # q -> matmul_input -> act
    assert resolve_role(roles, 'ln_output') is None        # no fallback: float
    assert resolve_role(dict(roles, fc2_input=None), 'fc2_input') is None
    got = resolve_role(roles, 'fc2_input')
    got['bits'] = 2                                        # a copy, not the block's dict
    assert roles['linear_input']['bits'] == 4


def test_overrides_disable_replace_or_merge():
    assert chain_lookup(dict(act=dict(bits=6)), 'fc1_input') == dict(bits=6)
    assert chain_lookup(dict(weight=U8), 'fc1_input') is MISSING
    assert apply_override(dict(U8), MISSING) == U8
    assert apply_override(dict(U8), None) is None
    assert apply_override(dict(U8), LOG) == LOG                       # with type: replaces
    assert apply_override(dict(U8), dict(bits=4)) == dict(U8, bits=4)  # without: merged
    assert apply_override(None, dict(bits=4)) is None                 # nothing to merge into


def test_block_validation_names_the_fix():
    validate_qcfg(dict(roles={}, calib=dict(images=3, split='train', seed=1)))
    with pytest.raises(ValueError, match='no `quant` block'):
        validate_qcfg(None)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rolez'\] in the quant block"):
        validate_qcfg(dict(rolez={}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['imgs'\] in quant.calib"):
        validate_qcfg(dict(calib=dict(imgs=3)))
    with pytest.raises(ValueError, match="scope='head': use one of"):
        validate_qcfg(dict(scope='head'))
    with pytest.raises(ValueError, match='each search is a dict with a `type`'):
        validate_qcfg(dict(searches=['fpcs']))


def test_calibration_settings_and_sizes():
    block = dict(calib=dict(split='val', seed=4, images=dict(classification=1000)))
    assert calib_settings(block) == dict(images=None, split='val', seed=4)
    assert calib_settings(block, images=2, split='train', seed=0) == dict(images=2, split='train',
                                                                          seed=0)
    with pytest.raises(ValueError, match='--calib-images must be at least 1, got 0'):
        calib_settings(block, images=0)
    images = block['calib']['images']
    assert calib_images_for('classification', None, images) == (
        1000, 'quant.calib.images.classification')
    assert calib_images_for('detection', None, images) == (1, 'the detection default')
    assert calib_images_for('classification', 5, images) == (5, '--calib-images')
    assert calib_images_for('classification', None, 7) == (7, 'quant.calib.images')
    assert calib_images_for(None) == (1, 'the default for an unknown task')
    assert scope_for_task('classification') == 'model'
    assert scope_for_task('detection') == 'backbone'
    assert scope_for_task('detection', 'detector') == 'model'


def test_plan_resolves_every_site_of_a_vit():
    model = tiny_vit()
    qcfg = dict(roles=dict(weight=dict(U8, symmetric=True, granularity='channel', ch_axis=0),
                           act=U4, fc2_input=LOG, attn_probs=LOG, patch_embed_input=None),
                overrides=[dict(name='*layers.5.*', roles=dict(act=dict(bits=8))),
                           dict(name='*layers.0.ffn*', roles=dict(fc2_input=None))])
    plan = {site.name: cfgs for site, cfgs in mmvq.plan(model, qcfg)}
    fc2 = 'backbone.layers.{}.ffn.layers.1'
    assert plan[fc2.format(1)]['input'] == LOG
    assert plan[fc2.format(0)]['input'] is None                       # disabled by name
    assert plan[fc2.format(5)]['input'] == dict(LOG, bits=8)          # merged by name
    assert plan['backbone.layers.5.attn.proj']['input'] == dict(U4, bits=8)
    assert plan['backbone.layers.1.attn.proj']['input'] == U4
    assert plan['backbone.patch_embed.projection']['input'] is None
    assert plan['head.layers.head']['weight']['bits'] == 8            # classifier: head too
    # per block ln1, attn, qkv, proj, ln2, fc1, fc2; the patch embed, final LayerNorm, head
    assert len(plan) == 6 * 7 + 3
    assert plan['backbone.layers.1.ln1'] == dict(input=None, output=None)    # LN roles unset: float
    with pytest.raises(KeyError, match="unknown quantizer type 'Nope' for role patch_embed_input"):
        mmvq.plan(model, dict(roles=dict(act=dict(type='Nope'))))
