"""This CPU as Linux describes it: what φ's CPU kernels are compiled for, and what run records name."""

from __future__ import annotations

from pathlib import Path


def cpuinfo(field: str) -> str | None:
    """The first CPU's `field` in /proc/cpuinfo ("model name", "flags", ...); None where Linux gives none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in lines if line.startswith(field)), None)


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux lists them (avx2, avx512f, ...); empty where /proc/cpuinfo has none."""
    return set((cpuinfo("flags") or "").split())
