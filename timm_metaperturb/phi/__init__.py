"""φ, the 82-parameter perturbation function, and the code that computes it.

- `module.py`: `MetaPerturb`, the `nn.Module` a user holds, and `SiteStatistics`, one injection site's running
  statistics. It picks the backend per call: `fused.py` where the compiled kernels load, `torch_ops.py` otherwise.
- `torch_ops.py`: φ on torch operators, any device.
- `fused.py`: the compiled kernels as torch operators (`cpu.py` builds `csrc/phi_cpu.cpp`; `cuda.py` is Triton).
- `reference.py`: the formulas written out plainly, the ground truth the others are tested against.
"""

from .module import COMPONENTS, EVAL_NOISE, MetaPerturb, RunMode, SiteStatistics
from .torch_ops import expected_softplus

__all__ = ["COMPONENTS", "EVAL_NOISE", "MetaPerturb", "RunMode", "SiteStatistics", "expected_softplus"]
