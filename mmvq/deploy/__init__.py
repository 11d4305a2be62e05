"""Deployment: ONNX export of calibrated models and onnxruntime evaluation.

``onnx`` and ``onnxruntime`` are imported only inside these functions, so the
rest of mmvq runs without them.
"""
from .export import EMULATED, PTF_QDQ, QDQ, WEIGHT_DQ, export_mode, export_onnx
from .report import export_report, format_report, runtime_kernels
from .runtime import (DeployedModel, graph_forward, kernels_of, onnx_dir_export_fn, ort_session,
                      run_session)

__all__ = ['export_onnx', 'export_mode', 'export_report', 'format_report', 'runtime_kernels',
           'DeployedModel', 'graph_forward', 'kernels_of', 'onnx_dir_export_fn', 'ort_session',
           'run_session', 'QDQ', 'PTF_QDQ', 'WEIGHT_DQ', 'EMULATED']
