"""Shared pieces of the thin click layer: one-line user errors and reusable option bundles."""
from __future__ import annotations

import functools
import signal
import sys
import threading

import click

from rtkit.engines.errors import RtkitError

USER_ERRORS = (RtkitError, FileNotFoundError, NotADirectoryError, PermissionError)
EXIT_USER_ERROR = 1
# rtkit's exit codes: 1 is every user error, bad options included (click's default for usage
# errors is 2, which rt-convert uses for "finished, some files failed").
click.exceptions.UsageError.exit_code = EXIT_USER_ERROR


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, so jobs record the run and release their locks."""


def _raise_terminated(signum, frame):
    raise Terminated()


def user_errors(fn):
    """Turn user errors into one line on stderr and exit code 1; bugs keep their traceback.
    Ctrl-C and SIGTERM stop with one line (exit 130 / 143) after the job has cleaned up."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
            raise click.ClickException(msg.splitlines()[0] if msg else type(e).__name__) from None
        except (KeyboardInterrupt, Terminated) as e:
            what = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
            click.echo(f"Error: stopped by {what}; finished files are kept, run the same command again "
                       f"to resume", err=True)
            sys.exit(143 if isinstance(e, Terminated) else 130)

    return wrapper


def engine_options(fn):
    """--engine, --checkpoint, --device, --backend, --precision: how a model is run."""
    decorators = [
        click.option("--engine", "-e", required=True,
                     help="An .onnx or .plan engine (its .json beside it), a checkpoint with its .json, "
                          "or a registered model name (see rt-export --list)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False),
                     help="Weights for a registered model name (official files accepted as published)."),
        click.option("--device", default="cpu", show_default=True,
                     help="cpu, cuda or cuda:N."),
        click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
                     help="Force a runner; default: by file type (.onnx -> onnxruntime, .plan -> "
                          "tensorrt, model name -> torch)."),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
                     show_default=True, help="Arithmetic precision of the torch runner."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


random_weights_option = click.option(
    "--random-weights", is_flag=True,
    help="Allow a full-size registered model without weights (random init: for timing only).")


def parse_extra(values: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs (runtime inputs such as CodeFormer w) with numbers parsed."""
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}", param_hint="--set")
        k, val = v.split("=", 1)
        for cast in (int, float):
            try:
                out[k] = cast(val)
                break
            except ValueError:
                continue
        else:
            out[k] = val
    return out


def shard_option(ctx, param, value):
    """click callback: I/N -> (i, n) with 0 <= i < n."""
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter("expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"need 0 <= i < n, got {value}")
    return i, n


def size_option(ctx, param, value):
    """click callback: N or WxH -> (height, width)."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        raise click.BadParameter("expected N or WxH, e.g. 112 or 128x112") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[1], parts[0]  # WxH on the command line, (H, W) inside
    raise click.BadParameter("expected N or WxH")
