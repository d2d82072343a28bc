"""A finalized network with φ exports with torch.export and to ONNX, through operators the exporters know, and
onnxruntime computes what PyTorch computes; a network still sampling its noise says why it cannot export."""

import onnx
import onnxruntime
import pytest
import timm
import torch

import timm_metaperturb as tm
from timm_metaperturb.phi import torch_ops

NETWORKS = [("resnet20", 32), ("conv4", 32), ("resnet18", 64)]  # the paper's two and a timm family


def finalized(name, size):
    """With the shipped φ: a random strong φ drives the logits to about 100, where float rounding alone differs by
    more than 1e-4 between any two ways of computing them."""
    torch.manual_seed(0)
    model = tm.create_model(name, num_classes=5, metaperturb=True)
    model.train()(torch.randn(16, 3, size, size))  # φ's running statistics away from their initial values
    return tm.finalize_for_inference(model, [torch.randn(24, 3, size, size)])


@pytest.mark.parametrize(("name", "size"), NETWORKS)
def test_onnx_runtime_computes_what_pytorch_computes(name, size, tmp_path):
    model = finalized(name, size)
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():  # where φ would otherwise take its fused kernels
        expected = model(x)
        torch_ops._expected_softplus_tables.clear()  # as in a new process: exporting is φ's first deterministic pass
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.onnx.export(model, (x,), tmp_path / "model.onnx", dynamo=True, dynamic_shapes={"x": {0: "batch"}})
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), expected), "exporting leaves the model as it was"
    graph = onnx.load(tmp_path / "model.onnx")
    assert {op.domain for op in graph.opset_import} == {""}, "standard ONNX operators only"
    runtime = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    for batch in (x, x[:3]):  # the batch dimension stays free
        (out,) = runtime.run(None, {runtime.get_inputs()[0].name: batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), expected[: len(batch)], rtol=0, atol=1e-4)


def test_sampled_noise_cannot_export_and_says_what_to_do(phi):
    model = tm.create_model("conv4", num_classes=5, metaperturb=True, phi=phi).eval()  # eval noise: "sample"
    with pytest.raises(RuntimeError, match=r"samples its noise.*finalize_for_inference"):
        torch.export.export(model, (torch.randn(2, 3, 32, 32),))
    plain = timm.create_model("conv4", num_classes=5).eval()
    torch.export.export(plain, (torch.randn(2, 3, 32, 32),))  # the same network without φ exports
