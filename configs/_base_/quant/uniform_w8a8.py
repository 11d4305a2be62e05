# Uniform baseline W8A8: weights int8 symmetric per output channel (min-max),
# every activation uint8 asymmetric per tensor (min-max), attention matmul
# operands and post-softmax included. Backbone scope.
_w = dict(type='mmvq.UniformQuantizer', bits=8, symmetric=True, granularity='channel', ch_axis=0)
_a = dict(type='mmvq.UniformQuantizer', bits=8)
quant = dict(
    name='Uniform W8A8 (min-max)',
    scope='backbone',
    roles=dict(weight=_w, act=_a),
    calib=dict(images=1, split='train', seed=0),
)
