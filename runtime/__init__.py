"""rtkit.runtime: runners over torch / ONNX Runtime / TensorRT and pipelines, image sources and
sinks, the image contract, and the whole-dataset job with its executors."""
from rtkit.runtime.runners import OnnxRunner, PipelineRunner, Runner, TensorRTRunner, TorchRunner, open_engine

__all__ = ["open_engine", "Runner", "TorchRunner", "OnnxRunner", "TensorRTRunner", "PipelineRunner",
           "convert", "Summary"]


def __getattr__(name):
    if name == "convert":
        from rtkit.runtime.converter import convert
        return convert
    if name == "Summary":
        from rtkit.runtime.job import Summary
        return Summary
    raise AttributeError(name)
