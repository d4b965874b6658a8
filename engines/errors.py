"""User-facing error types. The CLI prints these as one line and exits 1; bugs keep tracebacks."""
from __future__ import annotations

import importlib


class RtkitError(Exception):
    """Base of errors caused by user input (paths, files, options), not by bugs."""


class CheckpointError(RtkitError, ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class EngineError(RtkitError, ValueError):
    """An engine file that cannot be used here (corrupt, wrong version, wrong GPU...)."""


class MissingDependency(RtkitError, ImportError):
    """An optional package needed by the requested feature is not installed."""


def optional_import(module: str, *, extra: str, purpose: str, package: str | None = None):
    """Import an optional heavy dependency, or raise a one-line MissingDependency."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = package or module.split(".")[0]
        raise MissingDependency(f"{purpose} needs the '{pkg}' package: pip install 'rtkit[{extra}]' "
                                f"(or pip install {pkg})") from None
