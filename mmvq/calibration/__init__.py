"""Calibration algorithms and the PTQ loop (see mmvq.api for the basic flow)."""
