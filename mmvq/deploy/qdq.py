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


def qdq(x, scale, zero_point, axis, qmin, qmax):
    """:class:`ActQDQ` of ``x`` for float ``scale`` / ``zero_point`` (0-d, or
    1-D along ``axis``) and the code range ``[qmin, qmax]``."""
    signed = qmin < 0
    dtype = torch.int8 if signed else torch.uint8
    full = (-128, 127) if signed else (0, 255)
    scale = scale.detach().float()
    zp = zero_point.detach().round()
    lo = hi = None
    if (qmin, qmax) != full:
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        lo = ((qmin - zp) * scale).reshape(shape).to(x.dtype)
        hi = ((qmax - zp) * scale).reshape(shape).to(x.dtype)
    return ActQDQ.apply(x, scale, zp.to(dtype), lo, hi, axis, qmin, qmax)


def uniform_qdq(quantizer, x):
    """A calibrated :class:`~mmvq.quantizers.UniformQuantizer` applied to
    ``x`` as a QDQ pair (per tensor, or per channel / head along its axis)."""
    scale = quantizer.scale.reshape(-1)
    zp = quantizer.zero_point.reshape(-1)
    if scale.numel() == 1:
        return qdq(x, scale.reshape(()), zp.reshape(()), None, quantizer.qmin, quantizer.qmax)
    return qdq(x, scale, zp, quantizer.ch_axis % x.dim(), quantizer.qmin, quantizer.qmax)


def weight_dq(quantizer, weight, transpose=False):
    """A weight as its integer codes and a ``DequantizeLinear`` (per output
    channel, axis 0; with ``transpose`` a Linear's ``(in, out)`` layout, axis 1).

    The codes are :meth:`UniformQuantizer.codes`, so the dequantized weight is
    the fake-quantized one bit for bit."""
    codes = quantizer.codes(weight.detach())
    scale = quantizer.scale.detach().float().reshape(-1)
    zp = quantizer.zero_point.detach().round().reshape(-1).to(codes.dtype)
    axis = None if scale.numel() == 1 else 0
    if transpose:
        codes = codes.t().contiguous()
        axis = None if axis is None else 1
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return WeightDQ.apply(codes, scale, zp, axis)


__all__ = ['ActQDQ', 'WeightDQ', 'qdq', 'uniform_qdq', 'weight_dq']
