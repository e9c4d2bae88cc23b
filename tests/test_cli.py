"""CLI: help text a newcomer can read, and errors that say what to do (no model load needed)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from dsas.cli import app, parse_options
from dsas.models import ModelUnavailableError


def test_help_lists_every_command():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("demo", "fit", "generate", "calibrate", "explain", "sweep", "report"):
        assert cmd in res.output


def test_option_parsing():
    assert parse_options(["pca_dim=5", "inactive=vanilla", "soft=true"]) == {
        "pca_dim": 5,
        "inactive": "vanilla",
        "soft": True,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["pca_dim"])
    assert parse_options(["dsas.C=2", "name=a=b"]) == {"dsas.C": 2, "name": "a=b"}


# ---- user errors: one line naming the flag and the fix, before any model is loaded ---------------------------


def _no_model(monkeypatch):
    """Make any model load fail the test: argument errors must be found first."""
    import dsas

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(dsas, "load_model", boom)


def _fails_cleanly(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, AssertionError | TypeError)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_report_on_empty_folder_says_what_to_run(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    _fails_cleanly(res, "dsas sweep")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--option", "pca_dim"], ["--option 'pca_dim': expected key=value", "--option pca_dim=5"]),
        (["--option", "bogus=1"], ["--option bogus=1", "Unknown option", "bogus"]),
        (["--option", "pca_dim=[1]"], ["--option pca_dim=[1]", "pca_dim"]),
        (["--method", "cca"], ["--method/--gate: unknown method 'cca'", "caa"]),
        (["--gate", "dsass"], ["unknown gate 'dsass'"]),
        (
            ["--gate", "e2e-sigmoid"],
            ["gate 'e2e-sigmoid' is trained with its maps and needs method 'lineas'"],
        ),
        (["--sites", "model.(layers"], ["--sites 'model.(layers' is neither", "valid regex"]),
        (["--n", "0"], ["--n must be at least 1, got 0"]),
        (["--sets", "nope.csv"], ["--sets nope.csv: Unknown prompt set"]),
    ],
)
def test_fit_arguments_are_checked_before_the_model_loads(tmp_path, monkeypatch, args, needles):
    _no_model(monkeypatch)
    res = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "s"), *args])
    _fails_cleanly(res, *needles)


def test_output_folder_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "file")])
    _fails_cleanly(res, "--out", "exists and is not a folder")
    res = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "file" / "sub")])
    _fails_cleanly(res, "--out", "is a file")
    monkeypatch.setattr(os, "access", lambda *a: False)  # tests run as root, who may write anywhere
    res = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "new" / "s")])
    _fails_cleanly(res, "--out", "no permission to write in")


@pytest.mark.parametrize(
    "exc, needles",
    [
        (
            ModelUnavailableError("the GGUF is missing: pip install x"),
            ["--model 'smollm2-135m'", "pip install x"],
        ),
        (PermissionError(13, "Permission denied", "/data/model"), ["Permission denied", "/data/model"]),
        (
            OSError("repo id not found\nlocal path neither"),
            ["--model 'smollm2-135m': repo id not found local path"],
        ),
    ],
)
def test_model_load_errors_are_one_line(tmp_path, monkeypatch, exc, needles):
    import dsas

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(dsas, "load_model", fail)
    res = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "s")])
    _fails_cleanly(res, *needles)


def test_rich_markup_in_messages_is_printed_verbatim(tmp_path, monkeypatch, capsys):
    import dsas

    def fail(*a, **k):
        raise ValueError("strength [nan] is not finite; [bold]x[/]")

    monkeypatch.setattr(dsas, "load_model", fail)
    res = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "s")])
    _fails_cleanly(res, "strength [nan] is not finite; [bold]x[/]")
    from dsas.cli import print_sites

    print_sites([{"site": "a[nan]", "steered": "[nan]", "accuracy": float("nan")}])
    out = capsys.readouterr().out
    assert "a[nan]" in out and "[nan]" in out.replace("a[nan]", "")


@pytest.fixture(scope="module")
def saved_steerer(tmp_path_factory, tiny_tok, engine_sets):
    from conftest import make_tiny_model

    import dsas

    model = make_tiny_model("llama", len(tiny_tok))
    path = tmp_path_factory.mktemp("cli") / "caa"
    dsas.fit(model, tiny_tok, engine_sets, gate="none", progress=False).save(path)
    return path


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--strengths", "1,x,4"], ["--strengths '1,x,4': 'x' is not a number", "--strengths 1,2,4,8"]),
        (["--strengths", "1,nan"], ["--strengths '1,nan': every strength must be a finite number"]),
        (["--n-wiki", "0"], ["--n-wiki must be at least 1"]),
    ],
)
def test_sweep_arguments_are_checked_before_the_model_loads(
    tmp_path, monkeypatch, saved_steerer, args, needles
):
    _no_model(monkeypatch)
    res = CliRunner().invoke(
        app, ["sweep", "--out", str(tmp_path / "run"), "--steerer", str(saved_steerer), *args]
    )
    _fails_cleanly(res, *needles)


def test_steerer_folders_are_checked_and_named_apart(tmp_path, monkeypatch, saved_steerer):
    from dsas.cli import steerer_names

    _no_model(monkeypatch)
    res = CliRunner().invoke(app, ["generate", "--steerer", str(tmp_path / "none"), "-p", "hi"])
    _fails_cleanly(res, "--steerer", "no such folder", "dsas fit --out")
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["explain", "--steerer", str(tmp_path / "empty"), "-p", "hi"])
    _fails_cleanly(res, f"--steerer {tmp_path / 'empty'}", "not a dsas steerer")
    a, b = tmp_path / "a" / "caa", tmp_path / "b" / "caa"
    assert list(steerer_names([a, b, tmp_path / "x"])) == ["a-caa", "b-caa", "x"]
    with pytest.raises(ValueError, match="given twice"):
        steerer_names([a, tmp_path / "a" / ".." / "a" / "caa"])


def test_calibrate_texts_file_errors_name_the_file(tmp_path, monkeypatch, saved_steerer):
    _no_model(monkeypatch)
    bad = tmp_path / "neutral.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    res = CliRunner().invoke(app, ["calibrate", "--steerer", str(saved_steerer), "--texts", str(bad)])
    _fails_cleanly(res, f"--texts {bad}: not UTF-8 text", "save it as UTF-8")
    res = CliRunner().invoke(
        app, ["calibrate", "--steerer", str(saved_steerer), "--texts", str(tmp_path / "no.txt")]
    )
    _fails_cleanly(res, "--texts", "no.txt: cannot read it")
    res = CliRunner().invoke(app, ["calibrate", "--steerer", str(saved_steerer), "--max-ppl-increase", "nan"])
    _fails_cleanly(res, "--max-ppl-increase must be a finite number > 0, got nan")


def test_demo_steerer_names_are_checked_first(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--steerers", "caa,caa+dsass"])
    _fails_cleanly(res, "--steerers 'caa+dsass': unknown gate 'dsass'")


def test_generate_runs_with_a_tiny_model_and_prints_brackets(monkeypatch, saved_steerer, tiny_tok):
    """End to end without the embedded model: checks happen, then the steerer is checked against the model."""
    from conftest import make_tiny_model

    import dsas

    monkeypatch.setattr(dsas, "load_model", lambda name: (make_tiny_model("llama", len(tiny_tok)), tiny_tok))
    res = CliRunner().invoke(
        app, ["generate", "--steerer", str(saved_steerer), "-p", "[nan] the city", "--max-new-tokens", "3"]
    )
    assert res.exit_code == 0, res.output
    assert "[nan] the city" in res.stdout
    monkeypatch.setattr(
        dsas, "load_model", lambda name: (make_tiny_model("llama", len(tiny_tok), seed=5), tiny_tok)
    )
    res = CliRunner().invoke(app, ["generate", "--steerer", str(saved_steerer), "-p", "the city"])
    _fails_cleanly(res, "fitted on a different model", "check_weights=False")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    monkeypatch.setenv("DSAS_DEBUG", "1")
    res = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "s"), "--n", "0"])
    assert res.exit_code != 0 and isinstance(res.exception, ValueError)


def _sets_csv(tmp_path, engine_sets):
    """The fitting sets as a CSV file of split,text rows, as a user would pass with --sets."""
    import csv

    sets = tmp_path / "sets.csv"
    with sets.open("w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["split", "text"],
                *[[k, t] for k in ("source", "target", "control") for t in getattr(engine_sets, k)],
            ]
        )
    return sets


def test_fit_runs_with_a_tiny_model(tmp_path, monkeypatch, tiny_tok, engine_sets):
    from conftest import make_tiny_model

    import dsas

    sets = _sets_csv(tmp_path, engine_sets)
    monkeypatch.setattr(dsas, "load_model", lambda name: (make_tiny_model("gpt2", len(tiny_tok)), tiny_tok))
    args = ["fit", "--out", str(tmp_path / "s"), "--sets", str(sets), "--n", "8", "--option", "pca_dim=3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert dsas.Steerer.load(tmp_path / "s").config["options"]["dsas"]["pca_dim"] == 3


def test_fit_removal_preset_from_the_command_line(tmp_path, monkeypatch, tiny_tok, engine_sets):
    """`--removal` fits DSASConfig.removal()'s gates; `--option` goes on top; another gate is refused."""
    from conftest import make_tiny_model

    import dsas

    sets = _sets_csv(tmp_path, engine_sets)
    monkeypatch.setattr(dsas, "load_model", lambda name: (make_tiny_model("llama", len(tiny_tok)), tiny_tok))
    args = [
        "fit",
        "--out",
        str(tmp_path / "s"),
        "--sets",
        str(sets),
        "--removal",
        "--option",
        "acc_threshold=0.5",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    got = dsas.Steerer.load(tmp_path / "s").config["options"]["dsas"]
    want = dsas.DSASConfig.removal(acc_threshold=0.5)
    assert {
        k: got[k] for k in ("split", "floor", "control_fpr", "calibrate_on", "negatives", "acc_threshold")
    } == {
        "split": want.split,
        "floor": want.floor,
        "control_fpr": want.control_fpr,
        "calibrate_on": want.calibrate_on,
        "negatives": want.negatives,
        "acc_threshold": 0.5,
    }
    _no_model(monkeypatch)
    res = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "t"), "--removal", "--gate", "none"])
    _fails_cleanly(res, "--removal sets DSAS gates", "--gate dsas")
