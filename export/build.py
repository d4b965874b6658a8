"""One call from a model (name, training output or .onnx) to the engine files a user asked for.

``export_engine`` is what ``rt-export`` runs: the target from OUT's suffix (or ``to``), the
ONNX export with its parity check, and for a plan the ONNX -> TensorRT build beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from rtkit.engines.errors import EngineError, RtkitError

TARGETS = {".onnx": "onnx", ".plan": "plan", ".engine": "plan", ".trt": "plan"}


def export_target_kind(to: str | None, out: Path) -> str:
    """"onnx" or "plan": ``to`` if given (it must agree with OUT's suffix), else the suffix."""
    guessed = TARGETS.get(out.suffix)
    if to is None:
        if guessed is None:
            raise EngineError(f"cannot tell the target from {out.name}: give --to onnx|plan or end "
                              f"OUT in .onnx / .plan")
        return guessed
    if to not in ("onnx", "plan"):
        raise EngineError(f"--to must be onnx or plan, got {to!r}")
    if guessed is not None and guessed != to:
        raise EngineError(f"--to {to} but OUT ends in {out.suffix}; use .onnx for onnx, .plan for plan")
    return to


def export_engine(model: str | Path, out: str | Path, *, to: str | None = None,
                  checkpoint: str | Path | None = None, overrides: dict | None = None,
                  fp16: bool = False, fp16_io: bool = False, batch=None, opset: int = 17,
                  channels: str | None = None, image_size=None, workspace_gb: float = 4.0,
                  timing_cache: str | Path | None = None, parity: bool = True,
                  random_weights: bool = False, log: Callable[[str], None] | None = print) -> list[Path]:
    """Export ``model`` (a registered name, a weights file with its card, or an exported .onnx for a
    plan) to ``out``; returns the files written (engine and card; for a plan also its ONNX)."""
    out = Path(out)
    if fp16_io and not fp16:
        raise RtkitError("--fp16-io needs --fp16")
    target = export_target_kind(to, out)
    precision = "fp16" if fp16 else "fp32"
    if target == "plan":
        from rtkit.engines.errors import optional_import

        # Fail before a long ONNX export, not after it.
        optional_import("tensorrt", extra="gpu", purpose="building a TensorRT plan")
    if str(model).endswith(".onnx"):
        if target != "plan":
            raise EngineError(f"{model} is already an ONNX engine; use --to plan to build a plan")
        if checkpoint or overrides:
            raise RtkitError("--checkpoint and --override apply to a model, not to an ONNX file")
        from rtkit.export.tensorrt import to_plan

        to_plan(model, out, batch=batch, precision="fp16" if fp16 else None, workspace_gb=workspace_gb,
                timing_cache=timing_cache, image_size=image_size, parity=parity, log=log)
        return [out, out.with_suffix(".json")]
    _check_weights(model, checkpoint, random_weights)
    from rtkit.export.onnx import to_onnx

    onnx_out = out if target == "onnx" else out.with_suffix(".onnx")
    result = to_onnx(model, onnx_out, checkpoint=checkpoint, precision=precision, keep_io_types=not fp16_io,
            opset=opset, batch=batch or (1, 8, 64), input_channels=channels, parity=parity, log=log,
            overrides=overrides)
    if Path(result).suffix == ".json":  # a multi-part pipeline: its card lists one engine per part
        from rtkit.engines.card import read_card

        card = read_card(result)
        written = [Path(result), *(Path(result).parent / p.file for p in card.parts.values())]
        if target == "plan":
            written += _plan_parts(card, Path(result).parent, out, batch=batch, precision=precision,
                                   workspace_gb=workspace_gb, timing_cache=timing_cache,
                                   image_size=image_size, parity=parity, log=log)
        return written
    written = [onnx_out, onnx_out.with_suffix(".json")]
    if target == "plan":
        from rtkit.export.tensorrt import to_plan

        to_plan(onnx_out, out, batch=batch, precision=precision, workspace_gb=workspace_gb,
                timing_cache=timing_cache, image_size=image_size, parity=parity, log=log)
        written += [out, out.with_suffix(".json")]
    return written


def _plan_parts(card, root: Path, out: Path, **plan_args) -> list[Path]:
    """One TensorRT plan per part of a pipeline, and a card listing the plans: ``OUT.json`` beside
    ``OUT`` (the ONNX card keeps its own name), opened by ``--engine OUT.json``."""
    import dataclasses

    from rtkit.engines.card import write_card_file
    from rtkit.export.tensorrt import to_plan

    parts, written = {}, []
    for name, part in card.parts.items():
        plan = out.with_name(f"{out.stem}.{name}.plan")
        to_plan(root / part.file, plan, **plan_args)
        parts[name] = dataclasses.replace(part, file=plan.name)
        written.append(plan)
    card_file = out.with_name(out.name + ".json")
    write_card_file(card_file, dataclasses.replace(card, parts=parts))
    return [card_file, *written]


def _check_weights(model, checkpoint, random_weights: bool) -> None:
    """A full-size registered model without weights would export random weights: say so first."""
    if checkpoint is not None or random_weights or Path(str(model)).is_file():
        return
    from rtkit.engines import registry

    try:
        entry = registry.get_entry(str(model))
    except KeyError:
        return  # resolve_model reports the unknown name
    if entry.default_checkpoint is None and not entry.tiny:
        raise RtkitError(f"{model} has no weights here: pass its official checkpoint (--checkpoint PATH), "
                         f"or --random-weights to export random weights (timing only)")
