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
    (out / "run.json").write_text(json.dumps({"corruptions": {"images": 10, "clean": {**metrics, "accuracy": clean},
                                                              "corrupted": corrupted}}))  # fmt: skip


def test_columns_and_mce_against_base(tmp_path):
    cell = ("fmnist5-9", "resnet20")
    write_run(tmp_path, cell, "base", 0, clean=90.0, noisy=60.0, other=80.0)
    write_run(tmp_path, cell, "metaperturb", 0, clean=91.0, noisy=80.0, other=80.0, ece=2.0)
    summary = run_summary(json.loads((run_dir(tmp_path, cell, "metaperturb", 0) / "run.json").read_text()))
    assert summary["noise"] == 80.0 and summary["corrupted"] == 80.0 and summary["errors gaussian_noise"] == 100.0
    text = main(["--quick", "--table-only", "--rows", "base,metaperturb", "--runs-dir", str(tmp_path),
                 "--results", str(tmp_path / "R.md")])  # fmt: skip
    base_row = next(line for line in text.splitlines() if line.startswith("| base |"))
    phi_row = next(line for line in text.splitlines() if line.startswith("| metaperturb |"))
    assert "| 100.00 ± 0.00 |" in base_row and "| 76.00 ± 0.00 |" in base_row  # mean of 3 types at 60, 12 at 80
    # φ halves the noise types' errors (20 against 40) and matches base elsewhere: mCE = (3 x 50 + 12 x 100) / 15
    assert "| 90.00 ± 0.00 |" in phi_row and "| 2.00 ± 0.00 |" in phi_row
    assert "2 of 2 runs finished" in text and "<!-- robustness-quick:start -->" in (tmp_path / "R.md").read_text()
