"""rtkit.export: torch -> ONNX (fp32/fp16, dynamic batch), ONNX -> TensorRT plan, parity checks
against PyTorch, and the engine metadata file every engine carries.

Heavy pieces (onnx, onnxruntime, onnxconverter-common, tensorrt) are imported when used, so
``import rtkit.export`` stays cheap.
"""
from rtkit.export.metadata import EngineMeta, read_metadata, write_sidecar


def __getattr__(name):
    if name in ("to_onnx", "export_inputs", "export_spec"):
        from rtkit.export import onnx as _onnx
        return getattr(_onnx, name)
    if name == "to_plan":
        from rtkit.export.tensorrt import to_plan
        return to_plan
    if name in ("check_parity", "ParityReport", "Tolerance", "default_tolerance"):
        from rtkit.export import parity as _parity
        return getattr(_parity, name)
    raise AttributeError(f"module 'rtkit.export' has no attribute {name!r}")


__all__ = ["to_onnx", "to_plan", "check_parity", "ParityReport", "Tolerance", "default_tolerance",
           "export_inputs", "export_spec", "EngineMeta", "read_metadata", "write_sidecar"]
