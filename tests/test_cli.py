"""CLI: help text a newcomer can read, and errors that say what to do (no model load needed)."""

from __future__ import annotations

from typer.testing import CliRunner

from dsas.cli import _parse_options, app


def test_help_lists_every_command():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("demo", "fit", "generate", "calibrate", "explain", "sweep", "report"):
        assert cmd in res.output


def test_report_on_empty_folder_says_what_to_run(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code != 0
    assert "dsas sweep" in str(res.exception)


def test_option_parsing():
    assert _parse_options(["pca_dim=5", "inactive=vanilla", "soft=true"]) == {
        "pca_dim": 5,
        "inactive": "vanilla",
        "soft": True,
    }
    import pytest
    import typer

    with pytest.raises(typer.BadParameter, match="key=value"):
        _parse_options(["pca_dim"])
