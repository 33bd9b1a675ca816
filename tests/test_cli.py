"""The command line, run in-process on the embedded model."""

from pathlib import Path

import pytest
import torch

from allmem.cli import build_parser, main


@pytest.mark.parametrize("command", [[], ["convert"], ["generate"], ["demo"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*command, "--help"])
    assert done.value.code == 0
    assert "usage: allmem" in capsys.readouterr().out


@pytest.mark.real_model
def test_convert_then_generate_from_a_file(tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["convert", "--base", "smollm2", "--window", "32", "--sinks", "2", "--chunk", "16", "--out", str(out)]) == 0
    assert (out / "adapter.safetensors").is_file()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The capital of France is Paris. " * 20 + "The capital of France is")
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt-file", str(prompt), "--max-new-tokens", "4",
                 "--segment", "50", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip(), "no text generated"
    assert "cache" in captured.err and "MiB" in captured.err


def test_generate_with_compile_decodes_as_eager_and_leaves_eager_behind(tmp_path, capsys, tiny_smollm_dir):
    """``--compile`` runs the decode through torch.compile (the steady decode graphs are built) and
    greedy text equals the eager command's (the logits themselves are checked against eager in
    test_fast_paths); afterwards the process decodes eagerly again."""
    from allmem import layer, memory, modeling

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("one two three four five six seven eight nine ten " * 3)
    common = ["generate", "--model", str(tiny_smollm_dir), "--prompt-file", str(prompt), "--max-new-tokens", "6",
              "--window", "8", "--sinks", "2", "--chunk", "4", "--segment", "16", "--quiet"]
    capsys.readouterr()
    assert main(common) == 0
    eager = capsys.readouterr().out
    seen = []
    real_compile = torch.compile

    def spy(fn, **kwargs):
        seen.append(fn.__name__)
        return real_compile(fn, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", spy)
        assert main([*common, "--compile"]) == 0
    assert capsys.readouterr().out == eager and len(eager) > 1
    assert "decode_block" in seen  # the tiny SmolLM2 is a Llama: one graph per steady decode layer
    assert modeling._DECODE_BLOCK["fn"] is modeling.decode_block and memory._DECODE_READ["fn"] is memory.decode_read
    assert layer._DECODE_MIXER["fn"] is layer.decode_mixer


def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, capsys):
    assert main(["convert", "--window", "0", "--out", str(tmp_path / "x")]) == 2
    assert "window must be a positive integer" in capsys.readouterr().err
    assert main(["generate-data", "--out", str(tmp_path / "x.jsonl"), "--lengths", "10", "5"]) == 2
    assert capsys.readouterr().err == "error: --lengths 10 5: give MIN MAX with 0 < MIN <= MAX\n"


def test_a_missing_prompt_file_is_named_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import allmem.cli

    monkeypatch.setattr(allmem.cli, "_load_model", lambda *a: pytest.fail("the model loaded before the prompt was read"))
    assert main(["generate", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt file") and "does not exist (use - to read standard input)" in err


@pytest.mark.parametrize("option", [["--top-p", "0"], ["--top-k", "-1"], ["--temperature", "-0.5"],
                                    ["--max-new-tokens", "0"], ["--segment", "0"]])
def test_decoding_options_are_checked_by_the_parser(option, capsys):
    with pytest.raises(SystemExit) as done:
        main(["generate", "--prompt-file", "-", *option])
    assert done.value.code == 2
    assert f"error: argument {option[0]}: expected" in capsys.readouterr().err


def test_each_demo_plan_writes_its_own_folder_so_quick_then_default_runs(monkeypatch):
    """Regression: `make demo ARGS=--quick` then `make demo` failed with a traceback, because both
    wrote out/demo and the perplexity run refuses predictions made with other settings."""
    import allmem.demo

    seen = []
    monkeypatch.setattr(allmem.demo, "run_demo", lambda model, out, plan, **kw: seen.append((plan, str(out))))
    for args in (["demo", "--quick"], ["demo"], ["demo", "--full"], ["demo", "--quick", "--out", "elsewhere"]):
        assert main(args) == 0
    assert seen == [("quick", "out/demo-quick"), ("default", "out/demo"), ("full", "out/demo-full"),
                    ("quick", "elsewhere")]


def test_a_demo_into_a_folder_of_other_settings_is_one_error_line_and_keeps_the_folder(monkeypatch, tmp_path, capsys):
    """Regression: `allmem demo --out D`, with D holding another plan's perplexity predictions, ended
    in a ValueError traceback (the perplexity step refuses to mix settings) instead of an error line."""
    import allmem.demo
    from allmem.eval.common import check_run_settings

    check_run_settings(tmp_path / "ppl", {"length": 512})
    before = (tmp_path / "ppl" / "run_settings.json").read_text()
    monkeypatch.setattr(allmem.demo, "run_demo",
                        lambda model, out, plan, **kw: check_run_settings(Path(out) / "ppl", {"length": 2048}))
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other settings" in err and "Traceback" not in err
    assert (tmp_path / "ppl" / "run_settings.json").read_text() == before
