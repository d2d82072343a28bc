"""A φ made of two φs' parts: the noise generator of one and the scale function of the other. It tells which part
makes one φ transfer better than another (the runs then compare the two φs and the two mixtures).

    python -m benchmarks.phi_parts --noise PHI --scale PHI --output FOLDER

PHI is anything `load_phi` takes (a folder, the authors' .pth, a Hub id); the mixture is saved as a φ folder that
`--phi` takes. A mixture of the authors' φ stays out of the repository, like their checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from timm_metaperturb import load_phi
from timm_metaperturb.phi import MetaPerturb


def mixture(noise: MetaPerturb, scale: MetaPerturb) -> MetaPerturb:
    """A φ with `noise`'s noise generator and `scale`'s scale function (and its settings and running statistics)."""
    if {k: v.shape for k, v in noise.state_dict().items()} != {k: v.shape for k, v in scale.state_dict().items()}:
        raise ValueError("the two φs have different parameters: both must be MetaPerturb of the same form")
    state = scale.state_dict() | {k: v for k, v in noise.state_dict().items() if noise.is_noise_parameter(k)}
    mixed = MetaPerturb(**scale.config)
    mixed.load_state_dict(state)
    return mixed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", required=True, help="the φ whose noise generator is kept")
    parser.add_argument("--scale", required=True, help="the φ whose scale function is kept")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    mixed = mixture(load_phi(args.noise), load_phi(args.scale))
    mixed.provenance = {
        "title": f"noise of {args.noise}, scale of {args.scale}",
        "origin": f"the noise generator of {args.noise} and the scale function of {args.scale}, as they were",
        "command": f"python -m benchmarks.phi_parts --noise {args.noise} --scale {args.scale} --output {args.output}",
    }
    mixed.save_pretrained(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
