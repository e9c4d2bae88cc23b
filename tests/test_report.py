"""The HTML report: every table cell comes from the run's files; plots are inlined; Markdown summary too."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from dsas.report import build_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.cells, self.spans = [], [], []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "td":
            self._in_td = True
        if tag == "span" and "tok" in a.get("class", ""):
            self.spans.append(a["title"])

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def _write_run(d):
    pts = [
        {
            "key": "unsteered@0",
            "name": "unsteered",
            "strength": 0.0,
            "method": "none",
            "gate": "none",
            "toxicity": 0.5,
            "ppl": 10.0,
            "mc_acc": 0.6,
            "neutral_toxicity": 0.0,
            "false_steer_rate": 0.0,
            "true_steer_rate": 0.0,
            "samples": [{"prompt": "You are", "continuation": " <b>nice</b>"}],
            "per_prompt": {"neutral_continuations": [" a", " b", " c", " d"]},
        },
        {
            "key": "caa@1",
            "name": "caa",
            "strength": 1.0,
            "method": "caa",
            "gate": "none",
            "toxicity": 0.3,
            "ppl": 12.0,
            "mc_acc": 0.55,
            "false_steer_rate": 1.0,
            "true_steer_rate": 1.0,
        },
        {
            "key": "caa+dsas@4",
            "name": "caa+dsas",
            "strength": 4.0,
            "method": "caa",
            "gate": "dsas",
            "toxicity": 0.2,
            "ppl": 10.3,
            "mc_acc": 0.6,
            "false_steer_rate": 0.1,
            "true_steer_rate": 0.8,
            "per_prompt": {"neutral_continuations": [" a", " x", " c", " d"]},
        },
    ]
    (d / "sweep.jsonl").write_text("\n".join(json.dumps(p) for p in pts) + "\n")
    (d / "sites_caa+dsas.json").write_text(
        json.dumps(
            [
                {"site": "l0.attn", "accuracy": 0.9, "steered": True},
                {"site": "l0.mlp", "accuracy": 0.6, "steered": False},
            ]
        )
    )
    (d / "tokens.json").write_text(
        json.dumps(
            {
                "strength": 4.0,
                "columns": {
                    "toxic": [{"tokens": ["You", " idiot"], "scales": [0.5, 3.5], "prompt_tokens": 1}],
                    "neutral": [{"tokens": ["The", " city"], "scales": [0.1, 0.2], "prompt_tokens": 1}],
                },
            }
        )
    )


def test_report_contents(tmp_path):
    _write_run(tmp_path)
    out = build_report(tmp_path, title="t")
    page = out.read_text()
    p = _Collect()
    p.feed(page)
    assert len(p.imgs) == 3 and all(s.startswith("data:image/png;base64,") for s in p.imgs)
    assert p.spans == ["0.500", "3.500", "0.100", "0.200"]
    # toxicity at +5% ppl: caa interpolates (10,.5)-(12,.3) at 10.5 -> 0.45; dsas reaches 0.2 within budget.
    assert "0.45" in p.cells and "0.2" in p.cells
    assert "&lt;b&gt;nice&lt;/b&gt;" in page  # generated text is escaped
    md = (tmp_path / "summary.md").read_text()
    assert "| caa+dsas | 0.2 |" in md
    # neutral continuations unchanged: 3 of 4 for caa+dsas, 4 of 4 unsteered, none stored for caa
    header = next(line for line in md.splitlines() if line.startswith("| name | strength"))
    col = header.split(" | ").index("neutral_unchanged")
    rows = {r.split(" | ")[0]: r.split(" | ") for r in md.splitlines() if r.startswith("| ") and "@" not in r}
    assert rows["| caa+dsas"][col] == "0.75" and rows["| unsteered"][col] == "1" and rows["| caa"][col] == ""


def test_report_needs_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="dsas sweep"):
        build_report(tmp_path)


@pytest.mark.parametrize(
    ("recorded", "drawn"), [({"caa+dsas": 0.6, "iti+dsas": 0.9}, 0.6), (0.75, 0.75), (None, None)]
)
def test_site_accuracy_plot_draws_the_threshold_the_steerer_used(tmp_path, monkeypatch, recorded, drawn):
    """run.json records each DSAS steerer's own acc_threshold (runs of earlier versions: one number)."""
    import dsas.report

    _write_run(tmp_path)
    if recorded is not None:
        (tmp_path / "run.json").write_text(json.dumps({"acc_threshold": recorded}))
    seen = []
    monkeypatch.setattr(dsas.report, "plot_site_accuracy", lambda rows, thr: seen.append(thr) or "")
    build_report(tmp_path)
    assert seen == [drawn]


def test_plot_style_tells_methods_and_gates_apart():
    from dsas.report import plot_style

    one = [
        {"name": "caa", "method": "caa", "gate": "none"},
        {"name": "caa+dsas", "method": "caa", "gate": "dsas"},
    ]
    assert plot_style(one, one[0])[0] != plot_style(one, one[1])[0]  # the plain demo: color = gate
    many = [*one, {"name": "iti+dsas", "method": "iti", "gate": "dsas"}]
    (c_caa, ls_none), (c_caa2, ls_dsas), (c_iti, _) = (plot_style(many, p) for p in many)
    assert c_caa == c_caa2 != c_iti and ls_none != ls_dsas  # several methods: color = method, style = gate
