"""Sweep reports from run summaries."""

from __future__ import annotations

import json

import pytest

from pl_i2f.report import load_runs, main


def write_summary(directory, defense, val_acc, leakage, epsilon=None):
    directory.mkdir(parents=True)
    final = {"val/acc": val_acc, "test/acc": val_acc - 0.01, "leakage/expected_pixel_rmse": leakage}
    if epsilon is not None:
        final["privacy/epsilon"] = epsilon
    (directory / "summary.json").write_text(json.dumps({"final": final, "defense": defense, "points": []}))


def test_report_collects_every_run_and_draws_the_curves(tmp_path, capsys):
    write_summary(tmp_path / "0", {"name": "dpsgd", "noise_multiplier": 0.5}, 0.9, 0.05, epsilon=8.0)
    write_summary(tmp_path / "1", {"name": "dpsgd", "noise_multiplier": 2.0}, 0.7, 0.30, epsilon=1.0)
    write_summary(tmp_path / "2", {"name": "gaussian", "sigma": 0.01}, 0.85, 0.1)
    runs = load_runs(tmp_path)
    assert [r.label for r in runs] == ["dpsgd σ=0.5", "dpsgd σ=2", "gaussian σ=0.01"]
    assert runs[1].epsilon == 1.0 and runs[2].epsilon is None
    main([str(tmp_path)])
    table = (tmp_path / "tradeoff.md").read_text()
    assert table.count("\n") == 5 and "| 1 | dpsgd σ=2 | 0.7 | 0.69 | 0.3 | 1 | — |" in table
    png = (tmp_path / "tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "wrote" in capsys.readouterr().out


def test_report_without_summaries_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no summary.json below" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.97834, "0.9783"), (0.01, "0.01"), (20.0, "20"), (1234.56, "1235"), (0.0, "0"), (2.0, "2"),
        (2602118.4, "2.602e+06"), (1e10, "1e+10"), (3.4e-9, "3.4e-09"), (-0.000123456, "-1.235e-04"),
        (0.00123, "0.00123"), (None, "—"), (float("nan"), "nan"), (float("inf"), "inf"),
    ],
)
def test_format_number_follows_the_magnitude(value, text):
    from pl_i2f.report import format_number

    assert format_number(value) == text


def test_format_number_keeps_small_values_visible_beside_large_ones():
    from pl_i2f.report import format_number

    # the summary table's old fixed '.4f' printed lambda_min as 0.0000 beside condition_number 2602118
    assert format_number(4.1e-11) != "0" and float(format_number(4.1e-11)) == pytest.approx(4.1e-11)
    assert float(format_number(123456789.0)) == pytest.approx(123456789.0, rel=1e-3)


def test_report_without_leakage_says_what_is_missing_instead_of_an_empty_plot(tmp_path, capsys, recwarn):
    for i, sigma in enumerate((0.01, 0.1)):
        directory = tmp_path / str(i)
        directory.mkdir()
        final = {"val/acc": 0.9 - i / 10, "test/acc": 0.89}  # a run whose monitor never evaluated
        (directory / "summary.json").write_text(json.dumps({"final": final, "defense": {"name": "gaussian",
                                                                                          "sigma": sigma}}))
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "no run has leakage/expected_pixel_rmse" in out and "no run has privacy/epsilon" in out
    assert not (tmp_path / "tradeoff.png").exists()
    assert (tmp_path / "tradeoff.md").exists()
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]


def test_report_draws_only_the_axes_some_run_has(tmp_path, capsys):
    write_summary(tmp_path / "0", {"name": "dpsgd", "noise_multiplier": 1.0}, 0.9, None, epsilon=5.0)
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "no run has leakage" in out and "privacy/epsilon" not in out.split("note:")[-1]
    assert (tmp_path / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
