"""The robustness table: its columns from each run's corrupted evaluation, mCE against base on the same seed."""

import json

from benchmarks.robustness import main, run_summary
from benchmarks.transfer import run_dir
from timm_metaperturb.training.corruptions import CORRUPTIONS, FAMILIES


def write_run(runs, cell, row, seed, clean, noisy, other, ece=5.0):
    """A finished run whose noise types score `noisy`, the other types `other`, at every severity."""
    metrics = {"nll": 0.5, "ece": ece}
    corrupted = {t: {str(s): {**metrics, "accuracy": noisy if t in FAMILIES["noise"] else other} for s in range(1, 6)}
                 for t in CORRUPTIONS}  # fmt: skip
    out = run_dir(runs, cell, row, seed)
    out.mkdir(parents=True)
    run = {"corruptions": {"images": 10, "clean": {**metrics, "accuracy": clean}, "corrupted": corrupted},
           "adversarial": {"accuracy": {"0": clean, "8/255": noisy / 2, "2/255": noisy}}}  # fmt: skip
    (out / "run.json").write_text(json.dumps(run))


def test_columns_and_mce_against_base(tmp_path):
    cell = ("fmnist5-9", "resnet20")
    write_run(tmp_path, cell, "base", 0, clean=90.0, noisy=60.0, other=80.0)
    write_run(tmp_path, cell, "metaperturb", 0, clean=91.0, noisy=80.0, other=80.0, ece=2.0)
    summary = run_summary(json.loads((run_dir(tmp_path, cell, "metaperturb", 0) / "run.json").read_text()))
    assert summary[("accuracy", "noise")] == 80.0 and summary[("accuracy", "corrupted")] == 80.0
    assert summary[("errors", "gaussian_noise")] == 100.0 and summary[("ece", "blur")] == 2.0
    write_run(tmp_path, cell, "metaperturb-robust", 0, clean=89.0, noisy=70.0, other=80.0)
    text = main(["--quick", "--table-only", "--rows", "base,metaperturb", "--runs-dir", str(tmp_path),
                 "--results", str(tmp_path / "R.md")])  # fmt: skip
    assert "metaperturb-robust" not in text
    robust = main(["--quick", "--table-only", "--phi-row", "robust=elsewhere/phi", "--rows", "base,metaperturb-robust",
                   "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")])  # fmt: skip
    assert "| metaperturb-robust | 89.00 ± 0.00 |" in robust
    lines = text.splitlines()
    base_accuracy, base_calibration, _ = [line for line in lines if line.startswith("| base |")]
    phi_accuracy, phi_calibration, phi_pgd = [line for line in lines if line.startswith("| metaperturb |")]
    assert "| 100.00 ± 0.00 |" in base_accuracy and "| 76.00 ± 0.00 |" in base_accuracy  # 3 types at 60, 12 at 80
    # φ halves the noise types' errors (20 against 40) and matches base elsewhere: mCE = (3 x 50 + 12 x 100) / 15
    assert phi_accuracy.endswith("| 90.00 ± 0.00 | 1 |") and "| 5.00 ± 0.00 |" in base_calibration
    assert "| 2.00 ± 0.00 |" in phi_calibration and "| 5.00 ± 0.00 |" not in phi_calibration
    assert "eps**" in text and phi_pgd == "| metaperturb | 91.00 ± 0.00 | 80.00 ± 0.00 | 40.00 ± 0.00 | 1 |"  # 0, 2, 8
    assert "2 of 2 runs finished" in text and "<!-- robustness-quick:start -->" in (tmp_path / "R.md").read_text()
