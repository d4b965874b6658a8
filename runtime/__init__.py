"""rtkit.runtime: runners over torch / ONNX Runtime / TensorRT, image sources and sinks, and
the streaming whole-dataset converter."""
from rtkit.runtime.runners import OnnxRunner, Runner, TensorRTRunner, TorchRunner, open_engine

__all__ = ["open_engine", "Runner", "TorchRunner", "OnnxRunner", "TensorRTRunner", "convert"]


def __getattr__(name):
    if name in ("convert", "Summary"):
        from rtkit.runtime import converter as _c
        return getattr(_c, name)
    raise AttributeError(name)
