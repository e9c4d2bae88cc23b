"""Prompt sets: the shipped sets (sizes, disjointness, content) and the user-file loaders (formats, errors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsas.data import BUILTIN_PROMPT_SETS, CONCEPT_SETS, PromptSets, list_prompt_sets, load_prompt_sets
from dsas.eval import concept_pattern, concept_words

PEAR = re.compile(r"\bpears?\b", re.IGNORECASE)


# ---- shipped sets ----


def test_list_prompt_sets_names_every_shipped_file():
    listed = list_prompt_sets()
    assert set(listed) == set(BUILTIN_PROMPT_SETS) == {"toxicity", "concept", "animal", "pirate"}
    assert all(desc for desc in listed.values())
    data_dir = Path(__file__).resolve().parents[1] / "src" / "dsas" / "data"
    assert {p.stem for p in data_dir.glob("*.jsonl")} == set(BUILTIN_PROMPT_SETS)


@pytest.mark.parametrize(
    ("name", "evals", "min_eval"),
    [
        ("toxicity", {"toxic", "neutral"}, 200),
        ("concept", {"fruit", "other"}, 100),
        ("animal", {"animal", "other"}, 100),
        ("pirate", {"speech", "other"}, 100),
    ],
)
def test_builtin_sizes_and_eval_splits(name, evals, min_eval):
    sets = load_prompt_sets(name)
    assert sets.name == name
    for split in (sets.source, sets.target, sets.control):
        assert len(split) >= 64  # enough for a seed to resample the paper's 32
        assert len(set(split)) == len(split)
    assert set(sets.eval) == evals
    assert all(len(v) >= min_eval and len(set(v)) == len(v) for v in sets.eval.values())
    sets.validate()
    assert sets.meta.get("paired") is True and len(sets.source) == len(sets.target)


@pytest.mark.parametrize("name", BUILTIN_PROMPT_SETS)
def test_builtin_eval_prompts_never_appear_in_fitting_sets(name):
    sets = load_prompt_sets(name)
    fit = set(sets.source) | set(sets.target) | set(sets.control)
    all_eval = [t for v in sets.eval.values() for t in v]
    assert not fit & set(all_eval)
    assert len(set(all_eval)) == len(all_eval)  # no prompt is in two eval splits either
    assert not set(sets.source) & set(sets.target)
    assert not (set(sets.source) | set(sets.target)) & set(sets.control)


def test_concept_set_records_its_word_and_uses_it_only_in_target():
    sets = load_prompt_sets("concept")
    word = sets.meta["concept_word"]
    assert word == "pear"
    assert all(PEAR.search(t) for t in sets.target)
    for split in (sets.source, sets.control, sets.eval["fruit"], sets.eval["other"]):
        assert not any(PEAR.search(t) for t in split)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


@pytest.mark.parametrize("name", BUILTIN_PROMPT_SETS)
def test_builtin_splits_are_disjoint_up_to_case_and_punctuation(name):
    """A held-out prompt that differs from a fitting prompt only in case or punctuation is not held out."""
    sets = load_prompt_sets(name)
    splits = {"source": sets.source, "target": sets.target, "control": sets.control}
    splits |= {f"eval_{k}": v for k, v in sets.eval.items()}
    seen: dict[str, str] = {}
    for split, texts in splits.items():
        for t in texts:
            key = _norm(t)
            assert key not in seen, f"{name}: {t!r} ({split}) repeats a prompt of {seen[key]}"
            seen[key] = split


@pytest.mark.parametrize("name", CONCEPT_SETS)
def test_concept_sets_share_one_layout(name):
    """Every concept set: ~70 paired source / target and 70 control prompts, ~100 held-out prompts in and out of
    the category, and a concept word (or a style's markers) that only the target uses (so its rate measures the
    steering)."""
    sets = load_prompt_sets(name)
    assert sets.meta["paired"] is True and name in list_prompt_sets()
    assert 70 <= len(sets.source) == len(sets.target) and len(sets.control) >= 70
    ins, outs = sets.eval[sets.meta["eval_in"]], sets.eval[sets.meta["eval_out"]]
    assert len(ins) >= 100 and len(outs) >= 100
    assert set(sets.eval) == {sets.meta["eval_in"], sets.meta["eval_out"]}
    word = concept_pattern(concept_words(sets.meta) or "")
    assert all(word.search(t) for t in sets.target)
    for split in (sets.source, sets.control, ins, outs):
        assert not any(word.search(t) for t in split)


@pytest.mark.parametrize("name", CONCEPT_SETS)
def test_concept_targets_rewrite_their_source_line(name):
    """Line i of target is a rewrite of line i of source: it shares more words with that source line than with
    the other lines (nearly always), and the file's alignment beats every shifted one by far (a shuffled or
    shifted file fails). A style rewrite changes many words, so a few lines may tie."""
    sets = load_prompt_sets(name)
    src = [set(_norm(t).split()) for t in sets.source]
    tgt = [set(_norm(t).split()) for t in sets.target]
    n = len(src)
    overlap = [[len(s & t) / len(t) for t in tgt] for s in src]  # overlap[i][j]: source i vs target j
    own = [overlap[i][i] for i in range(n)]
    best_other = [max(overlap[j][i] for j in range(n) if j != i) for i in range(n)]
    assert sum(o > b for o, b in zip(own, best_other, strict=True)) >= 0.85 * n
    aligned = sum(own) / n
    assert min(own) > 0.15 and aligned > 0.5
    for shift in range(1, n):
        assert aligned > sum(overlap[(i + shift) % n][i] for i in range(n)) / n + 0.25, shift
    pair = dict(zip(sets.source, sets.target, strict=True))
    sub = load_prompt_sets(name, n=32, seed=5)
    assert [pair[s] for s in sub.source] == sub.target


def test_toxicity_set_is_lexically_separated_by_the_default_scorer():
    """The default scorer (profanity_check) must see the source as toxic and target/control as clean, or the
    set cannot drive a detoxification experiment."""
    profanity_check = pytest.importorskip("profanity_check")
    sets = load_prompt_sets("toxicity")
    means = {k: float(profanity_check.predict_prob(v).mean()) for k, v in
             {"source": sets.source, "target": sets.target, "control": sets.control,
              "toxic": sets.eval["toxic"], "neutral": sets.eval["neutral"]}.items()}  # fmt: skip
    assert means["source"] > 0.7
    assert means["target"] < 0.15 and means["control"] < 0.15 and means["neutral"] < 0.15
    assert means["toxic"] > 3 * means["neutral"]


# ---- subsampling ----


def test_subsample_is_seeded_deterministic_and_bounded():
    a = load_prompt_sets("toxicity", n=32, seed=3)
    b = load_prompt_sets("toxicity", n=32, seed=3)
    c = load_prompt_sets("toxicity", n=32, seed=4)
    full = load_prompt_sets("toxicity")
    assert (a.source, a.target, a.control) == (b.source, b.target, b.control)
    assert a.source != c.source
    assert len(a.source) == len(a.target) == len(a.control) == 32
    assert set(a.source) <= set(full.source) and set(a.control) <= set(full.control)
    assert a.eval == full.eval  # held-out prompts are never subsampled
    assert a.meta == full.meta


def test_paired_subsample_keeps_rewrites_aligned():
    full = load_prompt_sets("concept")
    pair = dict(zip(full.source, full.target, strict=True))
    sub = load_prompt_sets("concept", n=20, seed=7)
    assert [pair[s] for s in sub.source] == sub.target


def test_unpaired_subsample_shuffles_source_and_target_independently():
    sets = PromptSets(
        [f"s{i}" for i in range(50)], [f"t{i}" for i in range(50)], [f"c{i}" for i in range(50)]
    )
    sub = sets.subsample(10, seed=0)
    assert [s[1:] for s in sub.source] != [t[1:] for t in sub.target]


def test_n_larger_than_the_set_keeps_everything():
    sub = load_prompt_sets("concept", n=10_000, seed=0)
    full = load_prompt_sets("concept")
    assert sorted(sub.control) == sorted(full.control)


def test_bad_n_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        load_prompt_sets("toxicity", n=0)


# ---- user files ----


def _rows() -> list[tuple[str, str]]:
    return [
        ("source", "you are awful"),
        ("source", "what an idiot"),
        ("target", "you are kind"),
        ("target", "what a friend"),
        ("control", "the river is long"),
        ("control", "rain falls in spring"),
        ("eval_toxic", "shut up, you"),
        ("eval_neutral", "the recipe calls for"),
    ]


def _check_user_sets(sets: PromptSets, name: str) -> None:
    assert sets.name == name
    assert sets.source == ["you are awful", "what an idiot"]
    assert sets.target == ["you are kind", "what a friend"]
    assert sets.control == ["the river is long", "rain falls in spring"]
    assert sets.eval == {"toxic": ["shut up, you"], "neutral": ["the recipe calls for"]}


def test_jsonl_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [json.dumps({"meta": {"concept_word": "kindness"}})]
    lines += [json.dumps({"split": s, "text": t}) for s, t in _rows()]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line is fine
    sets = load_prompt_sets(path)
    _check_user_sets(sets, "mine")
    assert sets.meta == {"concept_word": "kindness"}
    assert load_prompt_sets(str(path)).source == sets.source  # str paths work too


def test_csv_file_with_bom_extra_columns_and_quoted_commas(tmp_path):
    path = tmp_path / "mine.csv"
    body = "split,text,notes\n" + "".join(f'{s},"{t}",x\n' for s, t in _rows())
    path.write_text("\ufeff" + body, encoding="utf-8")
    _check_user_sets(load_prompt_sets(path), "mine")


def test_directory_of_text_files(tmp_path):
    d = tmp_path / "myset"
    d.mkdir()
    by_split: dict[str, list[str]] = {}
    for s, t in _rows():
        by_split.setdefault(s, []).append(t)
    for split, texts in by_split.items():
        (d / f"{split}.txt").write_text("\n".join(texts) + "\n\n")
    (d / "README.txt").write_text("notes, not a split\n")
    (d / "meta.json").write_text(json.dumps({"concept_word": "kind"}))
    sets = load_prompt_sets(d)
    _check_user_sets(sets, "myset")
    assert sets.meta == {"concept_word": "kind"}


# ---- errors name the problem and the fix ----


def test_unknown_name_lists_builtins():
    with pytest.raises(ValueError, match=r"toxicty.*toxicity, concept, animal, pirate"):
        load_prompt_sets("toxicty")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "sets.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        load_prompt_sets(path)


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_empty_file(tmp_path, ext):
    path = tmp_path / f"empty.{ext}"
    path.write_text("split,text\n" if ext == "csv" else "")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompt_sets(path)


def test_missing_split_is_named(tmp_path):
    path = tmp_path / "nocontrol.jsonl"
    path.write_text("".join(json.dumps({"split": s, "text": t}) + "\n" for s, t in _rows() if s != "control"))
    with pytest.raises(ValueError, match=r"no control prompts.*add the missing split"):
        load_prompt_sets(path)


def test_directory_missing_files_names_them(tmp_path):
    (tmp_path / "source.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"target\.txt and control\.txt"):
        load_prompt_sets(tmp_path)


def test_empty_text_file_in_directory(tmp_path):
    for split in ("source", "target", "control"):
        (tmp_path / f"{split}.txt").write_text("x\n")
    (tmp_path / "eval_toxic.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"eval_toxic\.txt is empty"):
        load_prompt_sets(tmp_path)


def test_unknown_split(tmp_path):
    path = tmp_path / "typo.jsonl"
    path.write_text(json.dumps({"split": "sorce", "text": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 has split 'sorce'.*eval_<name>"):
        load_prompt_sets(path)


def test_bad_json_line_is_located(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"split": "source", "text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_prompt_sets(path)


def test_jsonl_line_without_text(tmp_path):
    path = tmp_path / "notext.jsonl"
    path.write_text(json.dumps({"split": "source", "prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r'line 1 must be an object with string fields "split" and "text"'):
        load_prompt_sets(path)


def test_csv_without_header(tmp_path):
    path = tmp_path / "noheader.csv"
    path.write_text("source,hello\ntarget,bye\n")
    with pytest.raises(ValueError, match="'split' and 'text' columns"):
        load_prompt_sets(path)


def test_csv_empty_text_cell(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("split,text\nsource,\n")
    with pytest.raises(ValueError, match="line 2 has an empty text"):
        load_prompt_sets(path)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_label_noise_swaps_exactly_the_requested_fraction(p):
    sets = load_prompt_sets("toxicity", n=32)
    noisy = sets.with_label_noise(p, seed=3)
    k = round(p * 32)
    assert len(noisy.source) == len(noisy.control) == 32 and noisy.target == sets.target
    assert sum(t in sets.control for t in noisy.source) == k
    assert sum(t in sets.source for t in noisy.control) == k
    assert sorted(noisy.source + noisy.control) == sorted(sets.source + sets.control)
    assert noisy.meta["label_noise"] == p and sets.with_label_noise(p, seed=3).source == noisy.source
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]"):
        sets.with_label_noise(1.5)


def test_csv_unquoted_commas_stay_in_a_last_text_column(tmp_path):
    """A spreadsheet-less user writes `source,you are, like, awful`: the text keeps its commas, not 'you are'."""
    path = tmp_path / "plain.csv"
    path.write_text(
        'split,text\nsource,you are, like, awful\nsource,x\ntarget,"kind, and\nwarm"\ntarget,y\n'
        "control,the city\ncontrol,z\n,,\n"
    )
    sets = load_prompt_sets(path)
    assert sets.source == ["you are, like, awful", "x"]
    assert sets.target == ["kind, and\nwarm", "y"]  # a quoted field may span lines
    assert sets.control == ["the city", "z"]


def test_csv_comma_in_a_text_before_other_columns_is_located(tmp_path):
    path = tmp_path / "mid.csv"
    path.write_text("split,text,notes\nsource,ok,n\nsource,you are, like, awful,n\n")
    with pytest.raises(
        ValueError, match=r"mid.csv, line 3 has 5 fields but the header has 3.*Quote the text"
    ):
        load_prompt_sets(path)


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_non_utf8_file_is_named(tmp_path, ext):
    path = tmp_path / f"latin.{ext}"
    body = "split,text\nsource,caf\xe9\n" if ext == "csv" else '{"split": "source", "text": "caf\xe9"}\n'
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"latin.{ext} is not UTF-8 text \(byte 0xe9 at position \d+\)"):
        load_prompt_sets(path)


def test_directory_with_bad_meta_or_encoding_names_the_file(tmp_path):
    for split, text in _rows()[:6]:
        with (tmp_path / f"{split}.txt").open("a") as f:
            f.write(text + "\n")
    (tmp_path / "meta.json").write_text("{concept: pear}")
    with pytest.raises(ValueError, match=r"meta.json is not valid JSON"):
        load_prompt_sets(tmp_path)
    (tmp_path / "meta.json").unlink()
    (tmp_path / "eval_x.txt").write_bytes(b"\xff\xfe bad\n")
    with pytest.raises(ValueError, match=r"eval_x.txt is not UTF-8 text"):
        load_prompt_sets(tmp_path)


_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"), min_size=1, max_size=40
).filter(lambda t: t.strip() == t and t)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXT, min_size=3, max_size=9), ext=st.sampled_from(["csv", "jsonl"]))
def test_prompt_files_round_trip(tmp_path, texts, ext):
    """Whatever the text (commas, quotes, brackets, newlines inside, unicode), what csv.writer / json.dumps
    write is what load_prompt_sets reads."""
    import csv

    rows = [(("source", "target", "control")[i % 3], t) for i, t in enumerate(texts)]
    path = tmp_path / f"sets.{ext}"
    with path.open("w", encoding="utf-8", newline="") as f:
        if ext == "csv":
            w = csv.writer(f)
            w.writerow(["split", "text"])
            w.writerows(rows)
        else:
            f.writelines(json.dumps({"split": s, "text": t}) + "\n" for s, t in rows)
    sets = load_prompt_sets(path)
    for split in ("source", "target", "control"):
        assert getattr(sets, split) == [t for s, t in rows if s == split]
