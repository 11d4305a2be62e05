"""Quantize/dequantize as ONNX ``QuantizeLinear`` / ``DequantizeLinear`` nodes.

Two autograd functions whose ``forward`` is mmvq's own arithmetic (what the
tracer runs, so the traced shapes and values are the fake-quantized model's)
and whose ``symbolic`` writes the standard ONNX nodes (opset >= 13, per-axis
scales), the form onnxruntime and TensorRT fuse into integer kernels:

* :class:`ActQDQ`: an activation ``x -> DequantizeLinear(QuantizeLinear(x))``
  with a per-tensor or per-axis scale and zero point (``uint8`` for unsigned,
  ``int8`` for signed codes). A code range narrower than the 8-bit container
  (``bits < 8``) is kept by clipping ``x`` to ``[(qmin - z) s, (qmax - z) s]``
  first (``Max``/``Min`` nodes): ``round(x / s) + z`` then stays in
  ``[qmin, qmax]`` and the 8-bit integer kernel computes the b-bit model.
* :class:`WeightDQ`: a weight stored as its integer codes (an ``int8`` /
  ``uint8`` initializer, a quarter of the float size) followed by
  ``DequantizeLinear`` with the per-output-channel scale and zero point.

``QuantizeLinear`` computes ``saturate(round_half_even(x / s) + z)`` and
mmvq ``clamp(round_half_even(x / s) + z)``: the same codes wherever the
runtime divides as PyTorch does (onnxruntime's CPU kernel multiplies by
``1 / s``; the two can differ by one code at exact rounding ties).
"""
import torch
from torch.onnx import symbolic_helper

from ..quantizers.uniform import fake_quant_affine

class ActQDQ(torch.autograd.Function):
    """Fake quantization that exports as ``QuantizeLinear -> DequantizeLinear``.

    Args (of :meth:`apply`):
        x (Tensor): activation.
        scale (Tensor): float32 scale, 0-d (per tensor) or 1-D (per axis).
        zero_point (Tensor): integer codes' zero point, ``uint8`` or ``int8``,
            the shape of ``scale``.
        bounds (tuple[Tensor, Tensor] | None): ``((qmin - z) s, (qmax - z) s)``
            shaped to broadcast against ``x`` when the code range is narrower
            than the 8-bit container, else ``None``.
        axis (int | None): the quantized axis of ``x`` for a 1-D scale.
        qmin, qmax (int): the code range (``bits`` wide).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, lo, hi, axis, qmin, qmax):
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        view = shape if axis is not None else ()
        s = scale.to(x.dtype).reshape(view)
        z = zero_point.to(x.dtype).reshape(view)
        return fake_quant_affine(x, s, z, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo, hi, axis, qmin, qmax):
        kw = {} if axis is None else dict(axis_i=axis)
        if not symbolic_helper._is_none(lo):
            x = g.op('Min', g.op('Max', x, lo), hi)    # b-bit codes in an 8-bit container
        q = g.op('QuantizeLinear', x, scale, zero_point, **kw)
        return g.op('DequantizeLinear', q, scale, zero_point, **kw)


class WeightDQ(torch.autograd.Function):
    """Integer weight codes -> ``DequantizeLinear`` (per axis or per tensor).

    Args (of :meth:`apply`):
        codes (Tensor): ``int8`` / ``uint8`` codes (a constant of the graph).
        scale (Tensor): float32, 0-d or 1-D along ``axis``.
        zero_point (Tensor): the codes' dtype, the shape of ``scale``.
        axis (int | None): the channel axis of ``codes`` for a 1-D scale.
    """

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis):
        shape = [1] * codes.dim()
        if axis is not None:
            shape[axis % codes.dim()] = -1
        view = shape if axis is not None else ()
        return (codes.float() - zero_point.float().reshape(view)) * scale.reshape(view)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):
        kw = {} if axis is None else dict(axis_i=axis)
        return g.op('DequantizeLinear', codes, scale, zero_point, **kw)


def qdq_fn(scale, zero_point, qmin, qmax, ch_axis=None, split=False):
    """``forward(x)``: a QDQ pair for float ``scale`` / ``zero_point`` (one
    value, or one per channel along ``ch_axis``) and the codes ``[qmin, qmax]``.

    The constants (the zero point in the codes' 8-bit type, the clip bounds of
    a narrower code range) are made here, once, so the graph holds them as
    initializers rather than as operations on the quantizer's buffers.

    ``split=True`` writes a per-axis quantizer as one per-tensor QDQ pair per
    slice of the axis (``Split -> QDQ ... -> Concat``), the same values: for
    attention operands quantized per head, whose head axis is a batch axis of
    the matmul. onnxruntime would otherwise fuse ``DQ(per-head A) @ B`` into
    ``MatMulIntegerToFloat``, which accepts only one zero point for A and
    fails at run time; behind the ``Concat`` the matmul stays a float one
    over exactly dequantized values. ``forward.pairs`` is the number of QDQ
    pairs a call writes.
    """
    signed = qmin < 0
    full = (-128, 127) if signed else (0, 255)
    scale = scale.detach().float().reshape(-1).clone()
    zp = zero_point.detach().float().reshape(-1).round()
    narrow = (qmin, qmax) != full
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
    zp = zp.to(torch.int8 if signed else torch.uint8)
    per_tensor = scale.numel() == 1

    def sliced(x):
        axis = ch_axis % x.dim()
        parts = torch.split(x, 1, dim=axis)
        return torch.cat([one(p) for one, p in zip(per_slice, parts)], dim=axis)

    def forward(x):
        if per_tensor:
            axis, view, args = None, (), (scale.reshape(()), zp.reshape(()))
        else:
            axis = ch_axis % x.dim()
            view = [1] * x.dim()
            view[axis] = -1
            args = (scale, zp)
        bounds = (lo.reshape(view).to(x.dtype), hi.reshape(view).to(x.dtype)) if narrow else (None, None)
        return ActQDQ.apply(x, *args, *bounds, axis, qmin, qmax)

    if split and not per_tensor:
        per_slice = [qdq_fn(s_, z_, qmin, qmax) for s_, z_ in zip(scale, zero_point.reshape(-1))]
        sliced.pairs = len(per_slice)
        return sliced
    forward.pairs = 1
    return forward


def uniform_qdq_fn(quantizer):
    """:func:`qdq_fn` of a calibrated :class:`~mmvq.quantizers.UniformQuantizer`
    (per tensor, per channel along its axis, per head as one pair per head)."""
    return qdq_fn(quantizer.scale, quantizer.zero_point, quantizer.qmin, quantizer.qmax,
                  quantizer.ch_axis, split=quantizer.granularity == 'head')


def weight_dq_fn(quantizer, weight, transpose=False):
    """``forward()``: a weight as its integer codes and a ``DequantizeLinear``
    (per output channel, axis 0; with ``transpose`` a Linear's ``(in, out)``
    layout, axis 1).

    The codes are :meth:`UniformQuantizer.codes`, made here once, so the
    dequantized weight is the fake-quantized one bit for bit and the graph
    stores the codes, not the float weight."""
    with torch.no_grad():
        codes = quantizer.codes(weight.detach())
    scale = quantizer.scale.detach().float().reshape(-1)
    zp = quantizer.zero_point.detach().round().reshape(-1).to(codes.dtype)
    axis = None if scale.numel() == 1 else 0
    if transpose:
        codes = codes.t().contiguous()
        axis = None if axis is None else 1
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return lambda: WeightDQ.apply(codes, scale, zp, axis)


__all__ = ['ActQDQ', 'WeightDQ', 'qdq_fn', 'uniform_qdq_fn', 'weight_dq_fn']
