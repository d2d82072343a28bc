"""The overhead benchmark's profile: it must show φ's own operators in φ's step and only there."""

from benchmarks.overhead import profile
from timm_metaperturb.phi import fused as phi_fused


def test_profile_separates_plain_and_phi_steps():
    text = profile("cpu", batch_size=4, steps=1)
    plain, phi_step, phi_eval = text.split("### ")[1:]
    assert plain.startswith("plain step") and phi_step.startswith("φ step (")
    if phi_fused.cpu_kernels() is not None:  # φ on its fused CPU kernels, operators named in torch.library
        sampled, scale, single_pass = (
            f"{phi_fused.OPS}::perturb",
            f"{phi_fused.OPS}::scale_features",
            phi_fused.EXPECTED_PERTURBATION,
        )
    else:  # on torch operators
        sampled, scale, single_pass = "_SampledPerturbation", "_ScaleFeatures", "aten::take"
    assert sampled not in plain
    assert sampled in phi_step  # the sampled noise path runs in training
    assert scale in phi_step and scale not in phi_eval  # batch statistics only in training
    assert sampled not in phi_eval  # the single pass uses the noise's expectation instead
    assert single_pass in phi_eval and single_pass not in phi_step
