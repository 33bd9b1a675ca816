"""``allmem eval`` end to end on a tiny model (the parser built here with ``register``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from allmem.eval.cli import register

FIXTURES = Path(__file__).parent / "fixtures"
TEXT = " ".join(f"Sentence {i} tells the story of a red fox and {i % 5} lazy dogs." for i in range(40))


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="allmem")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def specs(tiny_smollm_dir):
    return [f"allmem:{tiny_smollm_dir}?window=32&sinks=2&chunk=32&name=tiny-allmem", f"full:{tiny_smollm_dir}?name=tiny-full"]


@pytest.mark.parametrize("command", [[], ["longbench"], ["infinitebench"], ["lveval"], ["synthetic"], ["ppl"], ["lm-eval"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("eval", *command, "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: allmem eval" in text
    if command:
        assert "--systems" in text and "--out" in text


def test_synthetic_end_to_end_and_resume(tmp_path, specs, capsys):
    argv = ["eval", "synthetic", "--systems", *specs, "--out", str(tmp_path), "--tasks", "passkey", "niah_single_1",
            "--lengths", "200", "--depths", "1", "--samples", "1", "--max-new-tokens", "3", "--quiet"]
    assert run(*argv) == 0
    printed = capsys.readouterr().out
    assert "| passkey @ 200 |" in printed and "tiny-allmem" in printed and "tiny-full" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"tiny-allmem", "tiny-full"}
    assert summary["tiny-full"]["counts"]["passkey"] == {"200": 1}
    md = (tmp_path / "summary.md").read_text()
    assert "passkey by length and needle depth" in md and "### tiny-full" in md
    preds = tmp_path / "tiny-full" / "predictions.jsonl"
    before = preds.read_text()
    assert len(before.splitlines()) == 2
    assert run(*argv) == 0  # resumes: nothing new generated
    assert preds.read_text() == before


def test_ppl_end_to_end(tmp_path, specs, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "ppl"
    assert run("eval", "ppl", "--systems", *specs, "--out", str(out), "--lengths", "64", "--buckets", "0", "16", "32",
               "--text-file", str(text_file), "--docs", "2", "--quiet") == 0
    result = json.loads((out / "ppl.json").read_text())
    assert set(result["ppl"]) == {"tiny-allmem", "tiny-full"}
    assert list(result["ppl"]["tiny-full"]) == ["[0, 16)", "[16, 32)", "[32, 64)", "all"]
    assert (out / "ppl.png").is_file() and "| [32, 64) |" in (out / "ppl.md").read_text()
    assert "tiny-full" in capsys.readouterr().out


def test_long_context_benchmarks_end_to_end(tmp_path, specs):
    full = specs[1]
    assert run("eval", "longbench", "--data-dir", str(FIXTURES / "longbench"), "--systems", full, "--out",
               str(tmp_path / "lb"), "--subsets", "hotpotqa", "triviaqa", "--limit", "1", "--max-length", "300",
               "--quiet") == 0
    md = (tmp_path / "lb" / "summary.md").read_text()
    assert "| hotpotqa |" in md and "| average |" in md and "tiny-full" in md
    assert (tmp_path / "lb" / "tiny-full" / "hotpotqa.jsonl").is_file()
    assert run("eval", "lveval", "--data-dir", str(FIXTURES / "lveval"), "--systems", full, "--out",
               str(tmp_path / "lv"), "--subsets", "factrecall_en", "--limit", "1", "--max-length", "300",
               "--no-chat", "--quiet") == 0
    assert "factrecall_en" in json.loads((tmp_path / "lv" / "summary.json").read_text())["tiny-full"]["scores"]


def test_lm_eval_end_to_end(tmp_path, specs):
    import lm_eval  # noqa: F401  (the eval extra)
    assert run("eval", "lm-eval", "--systems", specs[0], "--out", str(tmp_path), "--tasks", "allmem_tiny_mc",
               "--include-path", str(FIXTURES / "lm_eval"), "--only-include-path", "--limit", "2", "--quiet") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "allmem_tiny_mc acc" in summary["tiny-allmem"]
    assert (tmp_path / "tiny-allmem" / "results.json").is_file()


def test_errors_are_one_line(tmp_path, capsys, specs):
    assert run("eval", "ppl", "--systems", "gpt:nothing", "--out", str(tmp_path), "--quiet") == 2
    assert "error: bad system spec" in capsys.readouterr().err
    assert run("eval", "synthetic", "--systems", specs[1], "--out", str(tmp_path), "--tasks", "cwe",
               "--lengths", "100", "--quiet") == 2
    assert "longer length" in capsys.readouterr().err
    assert run("eval", "longbench", "--data-dir", str(tmp_path / "missing"), "--systems", specs[1],
               "--out", str(tmp_path), "--quiet") == 2
    assert "not found" in capsys.readouterr().err
