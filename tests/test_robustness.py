"""Silent failures made loud or correct (issue 13): a padding token in a one-token step,
damaged saved states and adapters, two writers on one session, bad --session paths."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import allmem
import allmem.files as files
import allmem.modeling as modeling
from allmem import cli
from allmem.cache import CacheFileError
from allmem.session import SESSION_FORMAT
from tiny_models import ids, randomise_memory, tiny_base


# ------------------------------------------------ padding in a one-token step
@pytest.mark.parametrize("backend", ["blocked", "flex"])
@pytest.mark.parametrize("prompt,pad_step", [(12, 2), (1, 0)], ids=["in-window", "before-the-sinks-fill"])
def test_a_padding_token_in_a_one_token_step_leaves_no_key_behind(monkeypatch, backend, prompt, pad_step):
    """Row 1 gets a padding token (attention_mask 0) at one decode step. Its key must not enter
    the ring: every row's logits, through later one-token steps and a multi-token segment
    (the prefill path, FlexAttention or blocked), equal that row run alone without it."""
    monkeypatch.setenv("ALLMEM_SWA_BACKEND", backend)
    model = randomise_memory(allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, sinks=2, chunk=4)))
    x, steps, more = ids(2, prompt), ids(2, 6, seed=5), ids(2, 5, seed=9)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns that it is slow
        cache = model.new_cache()
        mask = torch.ones(2, prompt, dtype=torch.long)
        model(x, attention_mask=mask, cache=cache)
        outs = []
        for t in range(steps.shape[1]):
            column = torch.tensor([[1], [0 if t == pad_step else 1]])
            mask = torch.cat([mask, column], 1)
            outs.append(model(steps[:, t : t + 1], attention_mask=mask, cache=cache).logits)
        mask = torch.cat([mask, torch.ones(2, more.shape[1], dtype=torch.long)], 1)
        last = model(more, attention_mask=mask, cache=cache).logits
        for row in range(2):
            kept = [t for t in range(steps.shape[1]) if not (row == 1 and t == pad_step)]
            alone = model(torch.cat([x[row], steps[row, kept], more[row]])[None], use_cache=False).logits[0]
            got = torch.cat([outs[t][row] for t in kept] + [last[row]])
            torch.testing.assert_close(got, alone[prompt:], rtol=1e-4, atol=1e-5, msg=f"row {row}")
    assert cache.seen.tolist() == [prompt + 11, prompt + 10]


# ------------------------------------------------ damaged saved states
def _model_and_state(tmp_path, name="state.safetensors", **metadata):
    """A tiny converted model and a state of 20 tokens saved from it."""
    model = randomise_memory(allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, sinks=2, chunk=4)))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids(2, 20), cache=cache)
    path = tmp_path / name
    cache.save(path, metadata=metadata or None)
    return model, cache, path


def _rewrite(path, target, edit=None, keep_checksum=True):
    """Copy a saved state to ``target`` with ``edit(tensors)`` applied, its metadata kept (the
    checksum dropped unless ``keep_checksum``: a file from before checksums)."""
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if edit is not None:
        edit(tensors)
    if not keep_checksum:
        meta.pop("sha256")
    save_file(tensors, target, metadata=meta)
    return target


def _put_nan(tensors):
    tensors["layers.1.memory.weights.0"].view(-1)[3] = float("nan")


def test_a_saved_state_holding_nan_or_inf_is_refused_naming_the_file(tmp_path):
    model, cache, path = _model_and_state(tmp_path)
    old_file = _rewrite(path, tmp_path / "old-nan.safetensors", _put_nan, keep_checksum=False)
    with pytest.raises(CacheFileError, match=r"old-nan\.safetensors holds NaN or Inf values \(in layers\.1\.memory"):
        allmem.AllMemCache.load(old_file)
    # a state that went non-finite in memory is saved with a matching checksum: still refused
    cache.layers[0].window.ring_v.view(-1)[0] = float("inf")
    cache.save(tmp_path / "inf.safetensors")
    with pytest.raises(CacheFileError, match=r"inf\.safetensors holds NaN or Inf values \(in layers\.0\.window\.ring_v\)"):
        allmem.AllMemCache.load(tmp_path / "inf.safetensors")


def test_a_flipped_data_byte_in_a_saved_state_is_refused(tmp_path):
    _, _, path = _model_and_state(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        assert len(f.metadata()["sha256"]) == 64
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x01  # in the last tensor's data: still a valid file, still finite
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(CacheFileError, match=r"flipped\.safetensors is damaged: its tensors do not match the SHA-256"):
        allmem.AllMemCache.load(flipped)


def test_a_state_saved_before_checksums_still_loads_and_continues_exactly(tmp_path):
    model, cache, path = _model_and_state(tmp_path)
    old = _rewrite(path, tmp_path / "old.safetensors", keep_checksum=False)
    x = ids(2, 6, seed=3)
    with torch.no_grad():
        expected = model(x, cache=cache).logits
        got = model(x, cache=allmem.AllMemCache.load(old)).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "foreign", "directory"])
def test_unreadable_state_files_raise_one_error_naming_the_file(tmp_path, kind):
    _, _, path = _model_and_state(tmp_path)
    bad = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("not a state at all\n" * 20)
    elif kind == "foreign":
        save_file({"x": torch.zeros(2)}, bad)
    else:
        bad.mkdir()
    with pytest.raises(CacheFileError, match=rf"{kind}\.safetensors (is not a|is a directory)") as info:
        allmem.AllMemCache.load(bad)
    assert "\n" not in str(info.value)


# ------------------------------------------------ damaged adapters
def test_an_adapter_holding_nan_is_refused_before_any_parameter_changes(tmp_path):
    model = randomise_memory(allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, chunk=4)))
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter.safetensors"
    _rewrite(weights, weights, lambda t: t["model.layers.0.self_attn.alpha"].fill_(float("nan")))
    target = allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, chunk=4))
    before = {n: p.detach().clone() for n, p in target.memory_parameters().items()}
    with pytest.raises(modeling.AdapterFileError, match=r"adapter\.safetensors holds NaN or Inf values \(in model\.layers\.0"):
        target.load_memory_adapter(tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in target.memory_parameters().items())


def test_a_shipped_adapter_is_checked_against_its_sha256sums_once_per_process(tmp_path, monkeypatch):
    model = randomise_memory(allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, chunk=4)))
    folder = tmp_path / "tiny-shipped"
    model.save_pretrained(folder)
    weights = folder / "adapter.safetensors"
    (folder / "SHA256SUMS").write_text(f"{hashlib.sha256(weights.read_bytes()).hexdigest()}  adapter.safetensors\n")
    monkeypatch.setitem(modeling.SHIPPED_ADAPTERS, "tiny-shipped", folder)
    monkeypatch.setattr(files, "_SHA256_SEEN", {})
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(files.hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))

    for _ in range(2):  # loaded by name twice: the file is hashed once
        allmem.from_pretrained("tiny-shipped", base=tiny_base("qwen3"))
    assert len(hashed) == 1

    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x10  # one flipped bit in the weights: size unchanged, the mtime moves on
    weights.write_bytes(bytes(raw))
    with pytest.raises(modeling.AdapterFileError, match=r"adapter\.safetensors does not match its SHA-256 in .*SHA256SUMS"):
        allmem.from_pretrained("tiny-shipped", base=tiny_base("qwen3"))

    (folder / "SHA256SUMS").unlink()  # a shipped adapter must be verifiable
    with pytest.raises(modeling.AdapterFileError, match="SHA256SUMS is missing"):
        allmem.from_pretrained("tiny-shipped", base=tiny_base("qwen3"))


@pytest.mark.parametrize("name", ["smollm2-allmem", "smollm2-allmem-recall"])
def test_the_shipped_adapters_match_their_sha256sums_and_cards(name):
    folder = modeling.SHIPPED_ADAPTERS[name]
    modeling.verify_sha256sums(folder, required=True)
    assert (folder / "adapter.safetensors").stat().st_size <= 40e6
    digest = (folder / "SHA256SUMS").read_text().split()[0]
    assert digest in (folder / "README.md").read_text() and (folder / "recipe.yaml").is_file()


# ------------------------------------------------ `allmem chat/read --session F`
def _cli(args, stdin=""):
    """Run the CLI in a subprocess; returns (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-m", "allmem.cli", *args], input=stdin, capture_output=True, text=True,
                         env=env, timeout=600)
    return out.returncode, out.stdout, out.stderr


def _bad_session_file(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        _, _, good = _model_and_state(tmp_path, session=SESSION_FORMAT, phase="closed", turns=1, tokens_read=20)
        path.write_bytes(good.read_bytes()[:3000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("my notes, not a session\n")
    elif kind == "plain-state":
        _model_and_state(tmp_path, name=path.name)  # an AllMem state without session metadata
    elif kind == "nan-session":
        _, _, good = _model_and_state(tmp_path, session=SESSION_FORMAT, phase="closed", turns=1, tokens_read=20)
        _rewrite(good, path, _put_nan)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("command", ["chat", "read"])
@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "plain-state", "nan-session", "directory"])
def test_a_bad_session_file_is_one_error_line_before_the_model_loads(tmp_path, monkeypatch, capsys, command, kind):
    """`allmem chat/read --session F` with F unusable: exit 2 and one `error:` line naming F and
    the fix, before the model loads and before any input (stdin, or read's FILE) is read."""
    path = _bad_session_file(tmp_path, kind)

    def no_model(*_):
        raise AssertionError("the model was loaded before --session was checked")

    monkeypatch.setattr(cli, "_load_model", no_model)
    monkeypatch.setattr("sys.stdin", io.StringIO("a question\n"))
    args = [command, "--session", str(path)] + ([str(tmp_path / "not-read-yet.txt")] if command == "read" else [])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --session {path} ")
    fix = "a file path such as" if kind == "directory" else "pass another --session path"
    assert fix in err


def test_a_bad_session_file_is_refused_by_the_real_command_without_a_traceback(tiny_adapter, tmp_path):
    path = _bad_session_file(tmp_path, "truncated")
    rc, out, err = _cli(["chat", "--model", str(tiny_adapter), "--session", str(path)], stdin="hello\n")
    assert rc == 2 and out == ""
    assert err.startswith(f"error: --session {path} is not a readable safetensors file") and err.count("\n") == 1


def test_a_second_process_on_the_same_session_is_refused(tmp_path):
    path = tmp_path / "chat.safetensors"
    with FileLock(f"{path}.lock"):  # another `allmem chat --session` is running
        rc, out, err = _cli(["chat", "--session", str(path)], stdin="hello\n")
    assert rc == 2 and out == ""
    assert err == f"error: another process holds the session {path} (lock {path}.lock); wait until it exits " \
                  "or pass another --session\n"
    assert not path.exists()


def test_a_crashed_chat_does_not_leave_its_session_locked(tiny_adapter, tmp_path, monkeypatch, capsys):
    """A chat killed mid-session (SIGKILL: no cleanup runs) holds the lock no more: the next
    chat resumes the turns it had saved."""
    path = tmp_path / "chat.safetensors"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "allmem.cli", "chat", "--model", str(tiny_adapter), "--session",
                             str(path), "--max-new-tokens", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        proc.stdin.write(b"first question\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith(b"you> first question")
        proc.stdout.readline()  # the reply: the turn is saved right after it
        for _ in range(600):  # wait for the save (atomic rename), then crash the process
            if path.is_file():
                break
            time.sleep(0.1)
        assert path.is_file() and (tmp_path / "chat.safetensors.lock").exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

    monkeypatch.setattr("sys.stdin", io.StringIO("second question\n"))
    assert cli.main(["chat", "--model", str(tiny_adapter), "--session", str(path), "--max-new-tokens", "3"]) == 0
    assert "resumed" in capsys.readouterr().err
    with safe_open(str(path), framework="pt") as f:
        assert '"turns": 2' in f.metadata()["extra"]
