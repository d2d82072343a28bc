"""Building φ's fused CPU kernels (`csrc/phi_cpu.cpp`): the noise path, the modulation and the scale features in
a few passes over each image while it sits in cache, instead of a dozen separate operators per injection site.
`phi_fused.py` runs them (and the CUDA ones) under autograd.

Built with the machine's C++ compiler the first time φ runs on a CPU (about 40 s, then cached by
torch.utils.cpp_extension). Where they cannot be built (no compiler), or with TIMM_METAPERTURB_CPU_KERNELS=0,
φ runs on torch operators instead: the same function, slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("csrc") / "phi_cpu.cpp"
# no -ffast-math, which would break NaN propagation; on x86 with AVX-512, its 512-bit vectors (GCC stops at 256
# bits unless told otherwise; φ's loops gain from them), an option GCC knows only for x86
X86 = platform.machine().lower() in ("x86_64", "amd64")
FLAGS = ["-O3", *(["-mprefer-vector-width=512"] if X86 else []), "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
ENV_SWITCH = "TIMM_METAPERTURB_CPU_KERNELS"

logger = logging.getLogger(__name__)
_loaded: dict[str, ModuleType | None] = {}


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


def _build_name(march: str, source: Path) -> str:
    """One build per CPU kind, target and source file (-march=native code must not run on another CPU sharing the
    cache; another source, as benchmarks/kernel_profile.py --against builds, must not replace this one's)."""
    cpu = platform.processor() or platform.machine()
    key = f"{cpu}{sorted(cpu_flags())}{march}{'' if source == SOURCE else source.resolve()}"
    return "timm_metaperturb_phi_cpu_" + hashlib.sha1(key.encode()).hexdigest()[:10]


def build(march: str = "native", source: Path = SOURCE) -> ModuleType:
    """The kernels compiled for GCC's `-march` target (or loaded from torch's extension cache). φ runs the
    "native" build, vectorised for this CPU at its widest vectors; the tests also build older targets
    ("haswell": AVX2, "x86-64": no AVX), to check on one machine the code paths that other CPUs take."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        _build_name(march, source), [str(source)], extra_cflags=[f"-march={march}", *FLAGS], extra_ldflags=["-fopenmp"]
    )


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels, built on first call; None where switched off or where they cannot be built."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if "kernels" not in _loaded:
        logger.info("loading φ's fused CPU kernels (the first time on a machine this builds them, about 40 s)")
        try:
            _loaded["kernels"] = build()
        except Exception as error:  # no compiler, no ninja, a failed build: φ still works, only slower
            warnings.warn(
                f"φ's fused CPU kernels could not be built ({type(error).__name__}: {error}); φ runs on torch "
                f"operators instead (same results, 2-4x slower). Install a C++ compiler and ninja, or set "
                f"{ENV_SWITCH}=0 to skip this attempt.",
                stacklevel=2,
            )
            _loaded["kernels"] = None
    return _loaded["kernels"]
