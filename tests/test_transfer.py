"""The transfer benchmark driver: runs every (cell, row, seed), tabulates MetaPerturb's evaluation modes,
writes its section of the results file and resumes without re-running finished runs."""

import pytest

from benchmarks.transfer import main


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
    assert "**conv4 on digits**" in text and "<!-- transfer:start -->" in results.read_text()
    runs = sorted((tmp_path / "runs").rglob("run.json"))
    assert [p.parent.parent.name for p in runs] == ["base", "metaperturb"]
    stamps = {p: p.stat().st_mtime for p in runs}
    main(args)
    assert {p: p.stat().st_mtime for p in runs} == stamps, "finished runs are not run again"


def test_transfer_driver_rejects_unknown_cells_and_rows(tmp_path, capsys):
    for wrong in (["--cells", "cifar:resnet20"], ["--rows", "dropout"]):
        with pytest.raises(SystemExit):
            main([*wrong, "--runs-dir", str(tmp_path), "--results", str(tmp_path / "R.md")])
        assert "unknown" in capsys.readouterr().err
