"""How many CPU cores this process may use."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset) where the OS has one,
    which ``os.cpu_count()`` ignores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def native_bf16() -> bool:
    """Whether this machine runs bf16 natively, so that training in it is faster than in fp32: a CUDA GPU that
    supports it, or a CPU with bf16 instructions (AVX512-BF16 or AMX). Elsewhere bf16 is emulated, and slower."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    if torch.backends.mps.is_available():
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in checks if check is not None)
    except RuntimeError:  # a torch built without the CPU capability probes
        return False
