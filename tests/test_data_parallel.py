"""Target training on 2 CPU processes with `accelerate launch` (gloo): synchronised statistics reproduce the one-process
network, per-process statistics run and resume on another process count, mixed precision and accumulation run."""

import json
import signal
import socket
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from timm_metaperturb.training.checkpoints import STATE_FILE
from timm_metaperturb.training.target import CHECKPOINT_DIR


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "train/target.py"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            _free_port(), "train/target.py"]  # fmt: skip


def job(output, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--max-per-class", "10", "--val-fraction", "0.1", "--no-hflip", "--model", "conv4",
            "--image-size", "16", "--batch-size", "32", "--steps", "6", "--eval-every", "3", "--no-plots",
            "--no-progress", "--output", str(output), *extra]  # fmt: skip


def weights(folder) -> dict:
    return {**load_file(folder / "model.safetensors"), **load_file(folder / "metaperturb.safetensors")}


def test_a_process_draws_the_noise_one_process_draws_for_its_images():
    """With `first_image`, φ on the last images of a batch draws the eps that φ on the whole batch draws for them
    (from the same seed); without it, the eps of a batch's first images."""
    from dataclasses import replace

    from conftest import strong_phi

    from timm_metaperturb.phi.module import RunMode

    phi, x, mode = strong_phi(), torch.randn(8, 16, 6, 6), RunMode(components=("noise",))
    torch.manual_seed(3)
    whole = phi(x, mode=mode, training=True)
    torch.manual_seed(3)
    part = phi(x[5:], mode=replace(mode, first_image=5), training=True)
    torch.testing.assert_close(part, whole[5:], rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    assert not torch.allclose(phi(x[5:], mode=mode, training=True), whole[5:], atol=1e-3)


def test_synchronised_statistics_train_the_one_process_network(tmp_path):
    """Same global batch, batch norm's and φ's statistics over both processes, φ's noise drawn for each image as one
    process draws it: every weight and statistic ends within 1e-5 of the one-process run's."""
    flags = ["--sync-stats"]
    for processes in (1, 2):
        result = subprocess.run([*launch(processes), *job(tmp_path / str(processes), *flags)], capture_output=True,
                                text=True)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = weights(tmp_path / "1"), weights(tmp_path / "2")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5, msg=key)
    run = json.loads((tmp_path / "2" / "run.json").read_text())
    assert run["world_size"] == 2 and run["data"]["train"] == 100
    unsynchronised = tmp_path / "per-process"
    subprocess.run([*launch(2), *job(unsynchronised)], check=True, capture_output=True)
    apart = weights(unsynchronised)
    assert any((apart[k] - one[k]).abs().max() > 1e-4 for k in one), "each process's own statistics differ"


def test_per_process_statistics_resume_on_another_process_count(tmp_path):
    """A one-process run killed after a checkpoint resumes on two processes (φ's noise drawn per process) and ends
    with a network that reloads; the two-process run writes once, from the main process."""
    cut = tmp_path / "cut"
    checkpoint = cut / CHECKPOINT_DIR / STATE_FILE
    running = subprocess.Popen([*launch(1), *job(cut, "--steps", "40", "--checkpoint-every", "10")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not checkpoint.is_file() and running.poll() is None:
        time.sleep(0.01)
    running.send_signal(signal.SIGKILL)
    running.wait()
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 10 <= step < 40
    resumed = subprocess.run([*launch(2), *job(cut, "--steps", "40", "--checkpoint-every", "10", "--resume")],
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from") == 1, "one process prints"
    run = json.loads((cut / "run.json").read_text())
    assert run["world_size"] == 2 and run["final"]["step"] == 40 and run["final"]["accuracy"] > 50
    assert [h["step"] for h in run["history"]] == [3 * i for i in range(1, 14)] + [40]
    assert not checkpoint.parent.exists()


def test_mixed_precision_accumulation_and_a_tracker(tmp_path):
    """bf16 autocast and a batch split over 4 forwards train to a finite, saved network; TensorBoard gets the
    intermediate and final metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--mixed-precision", "bf16", "--grad-accum", "4", "--report-to", "tensorboard"]
    result = subprocess.run([*launch(1), *job(tmp_path / "bf16", *flags)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert run["config"]["mixed_precision"] == "bf16" and run["final"]["accuracy"] > 10
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "bf16").values() if v.is_floating_point())
    events = list((tmp_path / "bf16").rglob("events.out.tfevents*"))  # the metrics, and the run's settings
    scalars = {tag for e in events for tag in EventAccumulator(str(e)).Reload().Tags()["scalars"]}
    assert {"accuracy", "nll", "final_accuracy", "final_ece"} <= scalars
