"""Truncation, JSONL reading and resume helpers, tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allmem.eval.common import (
    DataFormatError,
    append_jsonl,
    format_table,
    hf_chat_template,
    load_samples,
    mean_percent,
    middle_truncate,
    read_predictions,
)
from eval_fakes import CharTokenizer, WordTokenizer


def test_middle_truncate_keeps_both_ends():
    text = "0123456789"
    assert middle_truncate(text, CharTokenizer(), 10) == text  # not longer: untouched
    # 10 tokens > 6: first 3 and last 3
    assert middle_truncate(text, CharTokenizer(), 6) == "012789"
    # odd budget: half = 7 // 2 = 3 on each side, 6 tokens in all (as the official int(n/2))
    assert middle_truncate(text, CharTokenizer(), 7) == "012789"


def test_middle_truncate_counts_special_tokens_like_the_official_code():
    # BOS makes 11 tokens > 10: keep [BOS, 0, 1, 2, 3] and [5..9]; BOS is skipped on decode
    assert middle_truncate("0123456789", CharTokenizer(bos=True), 10) == "0123" + "56789"


def test_middle_truncate_styles():
    text = "a b c d e f"
    # LongBench / LV-Eval decode "a b" and "e f" apart and concatenate the strings
    assert middle_truncate(text, WordTokenizer(), 4, style="longbench") == "a be f"
    # InfiniteBench decodes the joined token list once
    assert middle_truncate(text, WordTokenizer(), 4, style="infinitebench") == "a b e f"
    # within budget: LongBench keeps the text as is, InfiniteBench still round-trips it
    # through the tokenizer (here the round trip collapses the double space)
    assert middle_truncate("a  b", WordTokenizer(), 10, style="longbench") == "a  b"
    assert middle_truncate("a  b", WordTokenizer(), 10, style="infinitebench") == "a b"


def test_middle_truncate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_length"):
        middle_truncate("abc", CharTokenizer(), 0)
    with pytest.raises(ValueError, match="style"):
        middle_truncate("abc", CharTokenizer(), 2, style="other")  # type: ignore[arg-type]


def test_hf_chat_template_is_one_user_turn_with_generation_prompt():
    class Tokenizer:
        def apply_chat_template(self, messages, **kwargs):
            self.seen = (messages, kwargs)
            return "wrapped"

    tokenizer = Tokenizer()
    assert hf_chat_template(tokenizer, enable_thinking=False)("hello") == "wrapped"
    assert tokenizer.seen == (
        [{"role": "user", "content": "hello"}],
        {"tokenize": False, "add_generation_prompt": True, "enable_thinking": False},
    )


def test_load_samples_errors_name_file_line_and_field(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": "1", "b": ["x"]}\n\n{"a": "2"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"x\.jsonl, line 3: missing field 'b'"):
        load_samples(path, what="test file", fields={"a": str, "b": list})
    path.write_text('{"a": "1", "b": "x"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 1: field 'b' should be list, got str"):
        load_samples(path, what="test file", fields={"a": str, "b": list})
    path.write_text('{"a": "1", "b": [1]}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 1: field 'b' should be a list of strings"):
        load_samples(path, what="test file", fields={"b": list}, list_fields=("b",))
    path.write_text('{"a": "1"}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 2: not valid JSON"):
        load_samples(path, what="test file", fields={"a": str})
    path.write_text('{"a": "1"}\n{"a": "1"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 2: duplicate id '1' \(first on line 1\)"):
        load_samples(path, what="test file", fields={"a": str}, id_field="a")
    with pytest.raises(FileNotFoundError, match=r"test file not found: .*missing\.jsonl"):
        load_samples(tmp_path / "missing.jsonl", what="test file", fields={})


def test_load_samples_ids_default_to_line_numbers(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": "p"}\n\n{"a": "q"}\n', encoding="utf-8")
    samples = load_samples(path, what="t", fields={"a": str})
    assert [(s.id, s.line) for s in samples] == [("1", 1), ("3", 3)]


def test_read_predictions_repairs_a_torn_last_line(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    append_jsonl(path, {"id": "1", "pred": "a"})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "2", "pr')  # interrupted write
    assert [r["id"] for r in read_predictions(path)] == ["1"]
    assert path.read_text(encoding="utf-8").endswith("\n")
    # a complete last record without its newline is kept and terminated
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "2", "pred": "b"}))
    assert [r["id"] for r in read_predictions(path)] == ["1", "2"]
    append_jsonl(path, {"id": "3", "pred": "c"})
    assert [r["id"] for r in read_predictions(path)] == ["1", "2", "3"]
    # the scorer's gold field is required too
    with pytest.raises(DataFormatError, match=r"p\.jsonl, line 1: missing field 'answers'"):
        read_predictions(path, ("answers",))


def test_mean_percent_and_table():
    # (1 + 2/3 + 0) / 3 = 0.5555... -> 55.56
    assert mean_percent([1.0, 2 / 3, 0.0]) == 55.56
    assert mean_percent([]) == 0.0
    table = format_table({"full": {"a": 1.0, "b": 2.5}, "allmem": {"b": 3.0}})
    assert table == (
        "| subset | full | allmem |\n| --- | ---: | ---: |\n| a | 1.00 | - |\n| b | 2.50 | 3.00 |\n"
    )
