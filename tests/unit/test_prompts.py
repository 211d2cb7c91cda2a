"""Prompt files and built-in sets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dagcli.errors import DagError
from dagcli.prompts import SIMPLE_ANIMALS, load_prompts


def test_text_file_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\na cat\n\n  a dog  \n#x\n", encoding="utf-8")
    assert [p.prompt for p in load_prompts(f)] == ["a cat", "a dog"]


def test_jsonl_keeps_metadata(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a cat", "tag": 1}) + "\n\n" + json.dumps({"prompt": "a dog"}) + "\n")
    items = load_prompts(f)
    assert [p.prompt for p in items] == ["a cat", "a dog"]
    assert items[0].metadata == {"tag": 1}


def test_existing_path_wins_over_set_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "simple_animals").write_text("only this\n")
    assert [p.prompt for p in load_prompts("simple_animals")] == ["only this"]


def test_builtin_simple_animals():
    items = load_prompts("simple_animals")
    assert len(items) == 45 == len(set(SIMPLE_ANIMALS))
    assert load_prompts("builtin:simple_animals") == items


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "no prompts"),
        (b"# only a comment\n\n", "no prompts"),
        (b"\x00\x01\x02binary", "binary"),
        (b"caf\xe9\n", "not UTF-8"),
    ],
)
def test_bad_text_files(tmp_path, content, match):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    with pytest.raises(DagError, match=match):
        load_prompts(f)


@pytest.mark.parametrize("line", ["{not json", "[1, 2]", '{"text": "x"}', '{"prompt": ""}', '{"prompt": 3}'])
def test_bad_jsonl_lines(tmp_path, line):
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(DagError, match="line 1"):
        load_prompts(f)


def test_missing_source_lists_sets():
    with pytest.raises(DagError, match="simple_animals"):
        load_prompts("definitely-missing.txt")


# str.splitlines() ends a line at any of these; a prompt cannot contain them
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
PROMPT = (st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufeff" + LINE_BREAKS),
                  min_size=1, max_size=30)
          .map(str.strip).filter(lambda s: s and not s.startswith("#")))
PAD = st.sampled_from(["", " ", "\t", "  \t"])
LINE = st.one_of(
    st.tuples(st.just("prompt"), PROMPT),
    st.tuples(st.just("blank"), st.just("")),
    st.tuples(st.just("comment"), st.text(st.characters(blacklist_categories=("Cs",),
                                                        blacklist_characters="\x00" + LINE_BREAKS),
                                          max_size=20).map(lambda s: "#" + s)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(LINE, PAD, PAD, st.sampled_from(["\n", "\r\n"])), max_size=12), st.booleans())
def test_text_parsing_fuzz(tmp_path_factory, lines, bom):
    """A file built from known prompts, padded, between blank and comment lines: exactly the prompts come back."""
    text = "".join(f"{left}{content}{right}{end}" for (_, content), left, right, end in lines)
    f = tmp_path_factory.mktemp("fuzz") / "p.txt"
    f.write_bytes((("\ufeff" if bom else "") + text).encode("utf-8"))
    expected = [content for (kind, content), *_ in lines if kind == "prompt"]
    if expected:
        assert [p.prompt for p in load_prompts(f)] == expected
    else:
        with pytest.raises(DagError, match="no prompts"):
            load_prompts(f)
