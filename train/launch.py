"""How this process was launched (torch-free, so CLIs can ask without importing torch)."""
from __future__ import annotations

import os


def is_rank_zero() -> bool:
    """True outside torchrun and on its global rank 0: the process that reports and writes."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def set_torch_threads(threads: int | None = None) -> None:
    """``threads`` intra-op threads, else this machine's cores shared among the processes torchrun
    started on it (one process per GPU shares the cores; a single process takes them all)."""
    import torch

    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_procs))
