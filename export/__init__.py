"""rtkit.export: torch -> ONNX (fp32/fp16, dynamic batch), ONNX -> TensorRT plan, parity checks
against PyTorch; every engine gets its card (rtkit.engines.card).

Heavy pieces (onnx, onnxruntime, onnxconverter-common, tensorrt) are imported when used, so
``import rtkit.export`` stays cheap.
"""


def __getattr__(name):
    if name == "to_onnx":
        from rtkit.export.onnx import to_onnx
        return to_onnx
    if name in ("export_inputs", "export_spec"):
        from rtkit.export import graph
        return getattr(graph, name)
    if name == "to_plan":
        from rtkit.export.tensorrt import to_plan
        return to_plan
    if name in ("check_parity", "ParityReport", "Tolerance", "default_tolerance"):
        from rtkit.export import parity
        return getattr(parity, name)
    raise AttributeError(f"module 'rtkit.export' has no attribute {name!r}")


__all__ = ["to_onnx", "to_plan", "check_parity", "ParityReport", "Tolerance", "default_tolerance",
           "export_inputs", "export_spec"]
