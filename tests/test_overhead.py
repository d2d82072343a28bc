"""The overhead benchmark's profile: it must show φ's own operators in φ's step and only there."""

from benchmarks.overhead import profile


def test_profile_separates_plain_and_phi_steps():
    text = profile("cpu", batch_size=4, steps=1)
    plain, phi_step, phi_eval = text.split("### ")[1:]
    assert plain.startswith("plain step") and phi_step.startswith("φ step (eps kept)")
    assert "_SampledPerturbation" not in plain
    assert "_SampledPerturbation" in phi_step  # the sampled noise path runs in training
    assert "_SampledPerturbation" not in phi_eval  # the single pass uses the noise's expectation instead
    assert "aten::take" in phi_eval and "aten::take" not in phi_step
