"""Building φ's fused CPU kernels (`csrc/phi_cpu.cpp`): the noise path, the modulation and the scale features in
a few passes over each image while it sits in cache, instead of a dozen separate operators per injection site.
`fused.py` runs them (and the CUDA ones) under autograd.

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

import torch

from ..cpu_info import cpu_flags

SOURCE = Path(__file__).with_name("csrc") / "phi_cpu.cpp"
# no -ffast-math, which would break NaN propagation; on x86 with AVX-512, its 512-bit vectors (GCC stops at 256
# bits unless told otherwise; φ's loops gain from them), an option GCC knows only for x86
X86 = platform.machine().lower() in ("x86_64", "amd64")
FLAGS = ["-O3", *(["-mprefer-vector-width=512"] if X86 else []), "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
ENV_SWITCH = "TIMM_METAPERTURB_CPU_KERNELS"

logger = logging.getLogger(__name__)
_loaded: dict[str, ModuleType | None] = {}


def _build_name(march: str, source: Path) -> str:
    """One build per everything the binary depends on: CPU kind and target (-march=native code must not run on
    another CPU sharing the cache), compiler flags, the torch build it links against (two environments side by side
    must not load or replace each other's build) and the source file, by path and text (torch rebuilds a build whose
    source path changed, so two clones would otherwise rebuild each other's on every alternation)."""
    cpu = platform.processor() or platform.machine()
    torch_build = f"{torch.__version__} {torch.version.git_version}"
    text = hashlib.sha1(source.read_bytes()).hexdigest()
    key = f"{cpu}{sorted(cpu_flags())}{march}{FLAGS}{torch_build}{source.resolve()}{text}"
    return "timm_metaperturb_phi_cpu_" + hashlib.sha1(key.encode()).hexdigest()[:10]


def build(march: str = "native", source: Path = SOURCE) -> ModuleType:
    """The kernels compiled for GCC's `-march` target (or loaded from torch's extension cache). φ runs the
    "native" build, vectorised for this CPU at its widest vectors; the tests also build older targets
    ("haswell": AVX2, "x86-64": no AVX), to check on one machine the code paths that other CPUs take."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on every CPU-only machine
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
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
