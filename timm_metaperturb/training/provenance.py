"""What a recorded result ran on: the machine line written into run records, model cards and benchmarks."""

from __future__ import annotations

import os
import platform

import torch

from ..cpu_info import cpu_flags, cpuinfo


def machine() -> str:
    """CPU model with its widest vectors (what φ's CPU kernels' speed depends on: a CPU's model name can hide it),
    GPU if one is used, core count and torch version."""
    model = cpuinfo("model name") or platform.processor() or platform.machine()
    flags = cpu_flags()
    vectors = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}{f' ({vectors})' if vectors else ''}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def run_environment() -> dict[str, object]:
    """The machine and the thread count of a run: a seed gives the same run bit for bit only on the same CPU with the
    same number of threads (float sums are rounded in another order otherwise, and a training run amplifies that)."""
    return {"machine": machine(), "threads": torch.get_num_threads()}
