"""The command line, run in-process on the embedded model."""

import pytest

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


def test_bad_prompt_file_and_bad_window(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--prompt-file", str(tmp_path / "missing.txt")])
    assert main(["convert", "--window", "0", "--out", str(tmp_path / "x")]) == 2
    assert "window must be a positive integer" in capsys.readouterr().err
