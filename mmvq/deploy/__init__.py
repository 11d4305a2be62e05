"""Deployment: ONNX export of calibrated models and onnxruntime evaluation.

``onnx`` and ``onnxruntime`` are imported only inside these functions, so the
rest of mmvq runs without them.
"""
from .export import (EMULATED, EXPORT_FORMS, PTF_QDQ, QDQ, WEIGHT_DQ, ExportForm, export_mode,
                     export_onnx, register_export_form)
from .qdq import qdq_fn, weight_dq_fn
from .report import export_report, format_report, runtime_kernels
from .runtime import (DeployedModel, graph_forward, kernels_of, onnx_dir_export_fn, ort_session,
                      run_session)

__all__ = ['export_onnx', 'export_mode', 'export_report', 'format_report', 'runtime_kernels',
           'DeployedModel', 'graph_forward', 'kernels_of', 'onnx_dir_export_fn', 'ort_session',
           'run_session', 'QDQ', 'PTF_QDQ', 'WEIGHT_DQ', 'EMULATED', 'ExportForm', 'EXPORT_FORMS',
           'register_export_form', 'qdq_fn', 'weight_dq_fn']
