"""The transfer benchmark driver: runs every (cell, row, seed), tabulates MetaPerturb's evaluation modes,
writes its section of the results file and resumes without re-running finished runs."""

import json

import pytest

from benchmarks.transfer import (
    ABLATIONS,
    REGIME_SIZES,
    card_rows,
    main,
    merge_card_rows,
    regime_cell,
    regime_plot,
    rows,
    run_dir,
    target_args,
)


def test_transfer_driver_tabulates_every_mode_and_resumes(tmp_path):
    results = tmp_path / "RESULTS.md"
    args = ["--cells", "digits:conv4", "--rows", "base,metaperturb", "--seeds", "0", "--steps", "2",
            "--modes", "1,2,mean", "--workers", "2", "--runs-dir", str(tmp_path / "runs"), "--results",
            str(results)]  # fmt: skip
    text = main(args)
    for row in (
        "| base | final |",
        "| metaperturb | sample-1 |",
        "| metaperturb | sample-2 |",
        "| metaperturb | mean |",
    ):
        assert row in text
    assert "**conv4 on digits**" in text and "<!-- transfer-2steps:start -->" in results.read_text()
    runs = sorted((tmp_path / "runs").rglob("run.json"))
    assert [p.parent.parent.name for p in runs] == ["base", "metaperturb"]
    stamps = {p: p.stat().st_mtime for p in runs}
    main(args)
    assert {p: p.stat().st_mtime for p in runs} == stamps, "finished runs are not run again"


def test_transfer_driver_rejects_unknown_cells_and_rows(tmp_path, capsys):
    wrong_rows = ("dropout", "base+metaperturb", "metaperturb+metaperturb", "metaperturb+dropout")
    for wrong in (["--cells", "cifar:resnet20"], *(["--rows", row] for row in wrong_rows)):
        with pytest.raises(SystemExit):
            main([*wrong, "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")])
        assert "unknown" in capsys.readouterr().err


def test_combination_rows_train_the_methods_together(tmp_path):
    """A row named a+b trains the network with both methods and is tabulated like any other row."""
    text = main(["--cells", "digits:conv4", "--rows", "metaperturb+manifold_mixup", "--seeds", "0", "--steps", "2",
                 "--modes", "mean-bn", "--workers", "1", "--runs-dir", str(tmp_path), "--results",
                 str(tmp_path / "R.md")])  # fmt: skip
    run = json.loads((run_dir(tmp_path, ("digits", "conv4"), "metaperturb+manifold_mixup", 0) / "run.json").read_text())
    assert run["methods"] == ["metaperturb", "manifold_mixup"]
    assert "| metaperturb+manifold_mixup | mean-bn |" in text


def metrics(accuracy: float) -> dict:
    return {"accuracy": accuracy, "nll": 0.1, "ece": 1.0}


def write_run(runs, cell, row: str, seed: int, run: dict) -> None:
    """A finished run's run.json, one minute of run time."""
    path = run_dir(runs, cell, row, seed) / "run.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**run, "wall_time_s": 60}))


def write_evaluations(runs, cell, row: str, seed: int, accuracies: dict[str, float]) -> None:
    """A finished run with an accuracy per evaluation (sample-N, mean-bn, ...), as --final-modes writes them."""
    evaluations = {mode: metrics(accuracy) for mode, accuracy in accuracies.items()}
    write_run(runs, cell, row, seed, {"final": next(iter(evaluations.values())), "evaluations": evaluations})


def write_runs(runs, accuracies: dict[str, dict[int, float]], cell=("digits", "conv4")) -> None:
    """Finished runs of a baseline row on one cell, with only a final evaluation: {row: {seed: accuracy}}."""
    for row, by_seed in accuracies.items():
        for seed, accuracy in by_seed.items():
            write_run(runs, cell, row, seed, {"final": metrics(accuracy)})


def test_summary_compares_a_partial_row_with_base_on_its_own_cells(tmp_path):
    """A row finished on one cell of two still gets a mean and a gain, over base on that cell only."""
    write_runs(tmp_path, {"base": {0: 90.0}, "dropblock": {0: 95.0}})
    write_runs(tmp_path, {"base": {0: 80.0}}, cell=("fmnist5-9", "conv4"))
    text = main(["--cells", "digits:conv4,fmnist5-9:conv4", "--rows", "base,dropblock", "--seeds", "0",
                 "--table-only", "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")])  # fmt: skip
    assert "| base | final | 85.00 | +0.00 | – | 2 |" in text  # no φ runs: nothing to pair with
    assert "| dropblock | final | 95.00 | +5.00 | – | 1 |" in text


def test_cell_table_pairs_each_row_with_base_seed_by_seed(tmp_path):
    """The gain column subtracts base's accuracy on the same seed; a seed base lacks is left out of the pairs."""
    write_runs(tmp_path, {"base": {0: 90.0, 1: 94.0}, "dropblock": {0: 91.0, 1: 96.0, 2: 99.0}})
    text = main(["--cells", "digits:conv4", "--rows", "base,dropblock", "--seeds", "0,1,2", "--table-only",
                 "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")])  # fmt: skip
    assert "| base | final | 92.00 ± 2.83 | 0.100 ± 0.000 | 1.00 ± 0.00 | 2 | +0.00 (0.00) | – |" in text
    # gains +1 and +2 on seeds 0 and 1 (seed 2 has no base): mean +1.50, standard error stdev / sqrt(2) = 0.50
    assert "| dropblock | final | 95.33 ± 4.04 | 0.100 ± 0.000 | 1.00 ± 0.00 | 3 | +1.50 (0.50) | – |" in text


def test_summary_pairs_a_row_with_base_on_the_seeds_both_have(tmp_path):
    """One seed of a row against base's two: its gain is over base's same seed, not over base's mean."""
    write_runs(tmp_path, {"base": {0: 90.0, 1: 94.0}, "dropblock": {0: 95.0}})
    text = main(["--cells", "digits:conv4", "--rows", "base,dropblock", "--seeds", "0,1", "--table-only",
                 "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")])  # fmt: skip
    assert "| dropblock | final | 95.00 | +5.00 | – | 1 |" in text  # 95 - 90 on seed 0; base's mean 92 would say +3


def test_every_row_is_paired_with_the_shipped_phis_default_seed_by_seed(tmp_path):
    """The last column answers "does φ beat this row?": φ's default (mean-bn) minus the row, on the seeds both have,
    per cell and, in the summary, averaged over the cells where φ ran."""
    write_runs(tmp_path, {"base": {0: 90.0, 1: 94.0}, "dropblock": {0: 92.0, 1: 95.0, 2: 97.0}})
    write_runs(tmp_path, {"base": {0: 80.0}, "dropblock": {0: 85.0}}, cell=("fmnist5-9", "conv4"))
    for seed, (sampled, default) in {0: (90.5, 93.0), 1: (94.5, 94.0)}.items():
        write_evaluations(tmp_path, ("digits", "conv4"), "metaperturb", seed, {"sample-1": sampled, "mean-bn": default})
    text = main(["--cells", "digits:conv4,fmnist5-9:conv4", "--rows", "base,dropblock,metaperturb", "--seeds", "0,1,2",
                 "--table-only", "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")])  # fmt: skip
    fmnist, digits = text.split("**conv4 on fmnist5-9**")[1].split("**conv4 on digits**")  # CELLS' order

    def pairs(table: str, row: str, mode: str) -> str:
        """A cell-table line's last three columns: seeds, minus base, φ's lead."""
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} | {mode} |"))
        return "|" + "|".join(line.split("|")[-4:])

    # φ 93, 94 against DropBlock 92, 95 on seeds 0 and 1 (seed 2 has no φ run): +1 and -1, mean 0, error 1
    assert pairs(digits, "dropblock", "final") == "| 3 | +1.50 (0.50) | +0.00 (1.00) |"
    assert pairs(digits, "base", "final") == "| 2 | +0.00 (0.00) | +1.50 (1.50) |"
    assert pairs(digits, "metaperturb", "sample-1") == "| 2 | +0.50 (0.00) | +1.00 (1.50) |"
    assert pairs(digits, "metaperturb", "mean-bn") == "| 2 | +1.50 (1.50) | +0.00 (0.00) |"
    assert pairs(fmnist, "dropblock", "final") == "| 1 | +5.00 | – |", "no φ run on this cell: nothing to pair"
    # the summary averages φ's lead over the one cell φ ran on, and says so: (1) of DropBlock's 2 cells
    assert "| dropblock | final | 89.83 | +3.25 | +0.00 (1) | 2 |" in text


def test_regime_cells_and_plot(tmp_path):
    assert target_args("fmnist5-9@20")[-2:] == ["--max-per-class", "20"]
    assert regime_cell(100) == ("fmnist5-9", "resnet20"), "100 per class is the main table's cell, not run twice"
    for n in REGIME_SIZES:
        for row, evaluations in (("base", {"final": n}), ("metaperturb", {"sample-10": n + 1, "mean-bn": n + 2})):
            write_evaluations(tmp_path, regime_cell(n), row, 0, evaluations)
    regime_plot(tmp_path, [0], tmp_path / "regime.png")
    assert (tmp_path / "regime.png").read_bytes()[:4] == b"\x89PNG"
    rows = card_rows(tmp_path, [regime_cell(20)], [0], "here")
    assert rows == [{"target": "fmnist5-9@20", "network": "resnet20", "base": "20.00 (1)", "φ sample-10": "21.00 (1)",
                     "φ mean-bn": "22.00 (1)", "measured": "here"}]  # fmt: skip


def test_card_rows_of_another_measurement_stay_and_a_remeasured_row_keeps_its_place():
    """Rows tabulated at 10,000 steps join the 800-step rows on the card; tabulating a cell again replaces it."""
    short = [{"target": t, "network": "conv4", "base": "90.00 (3)", "measured": "800 steps"} for t in ("a", "b")]
    longer = [{"target": "a", "network": "conv4", "base": "91.00 (4)", "measured": "10000 steps"}]
    card = merge_card_rows(short, longer)
    assert card == [*short, *longer]
    again = [{**short[0], "base": "89.00 (5)"}]
    assert merge_card_rows(card, again) == [again[0], short[1], longer[0]]


def test_ablation_rows_and_phi_rows(tmp_path, capsys):
    table = rows(None, {"meta150": "phi150"}, ablation=True)
    assert list(table) == ["base", "metaperturb", "metaperturb-meta150", *ABLATIONS]
    assert table["metaperturb-meta150"] == ["--method", "metaperturb", "--phi", "phi150"]
    assert table["metaperturb-no-scale"] == ["--method", "metaperturb", "--phi-components", "noise"]
    write_evaluations(tmp_path, ("fmnist5-9", "resnet20"), "metaperturb-no-noise", 0, {"mean-bn": 90.0})
    results = tmp_path / "R.md"
    text = main(["--ablation", "--table-only", "--seeds", "0", "--runs-dir", str(tmp_path), "--results", str(results)])
    assert (
        "| metaperturb-no-noise | mean-bn | 90.00 ± 0.00 |" in text and "<!-- ablation:start -->" in results.read_text()
    )
    other = main(["--ablation", "--table-only", "--seeds", "0", "--cells", "digits:resnet20", "--runs-dir",
                  str(tmp_path), "--results", str(results)])  # fmt: skip
    assert "**resnet20 on digits**" in other and "on fmnist5-9" not in other
    with pytest.raises(SystemExit):
        main(["--phi-row", "phi150", "--runs-dir", str(tmp_path), "--results", str(results)])
    assert "NAME=PATH" in capsys.readouterr().err


def test_quick_suite_is_four_targets_base_and_the_shipped_phi(tmp_path):
    for cell in ("hebrew@20", "georgian@16"):
        for row in ("base", "metaperturb"):
            write_evaluations(tmp_path, (cell, "resnet20"), row, 0, {"mean-bn": 50.0, "final": 40.0})
    args = ["--suite", "--table-only", "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")]
    quick = main([*args, "--quick"])
    assert "**resnet20 on hebrew@20**" in quick and "| metaperturb | mean-bn | 50.00 ± 0.00 |" in quick
    assert "georgian" not in quick and "dropblock" not in quick and "of 8 runs finished" in quick
    full = main([*args, "--seeds", "0", "--authors-phi", str(tmp_path / "absent.pth")])
    assert "**resnet20 on georgian@16**" in full and "dropblock" not in full and "of 12 runs finished" in full


def test_selection_is_the_held_out_scripts_and_only_the_rows_asked_for(tmp_path):
    for row, accuracy in (("base", 40.0), ("metaperturb-s1", 55.0)):
        write_evaluations(tmp_path, ("heldout@10", "resnet20"), row, 0, {"mean-bn": accuracy, "final": accuracy})
    text = main(["--selection", "--table-only", "--seeds", "0", "--rows", "base,metaperturb-s1", "--phi-row",
                 "s1=absent/phi", "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")])  # fmt: skip
    assert "**resnet20 on heldout@10**" in text and "| metaperturb-s1 | mean-bn | 55.00 ± 0.00 |" in text
    assert "2 of 2 runs finished" in text and "<!-- selection:start -->" in (tmp_path / "R.md").read_text()
    assert target_args("heldout@10")[-4:] == ["115-225", "--no-hflip", "--max-per-class", "10"]
