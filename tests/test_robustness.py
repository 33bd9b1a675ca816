"""Silent failures made loud or correct (issue 13): a padding token in a one-token step,
damaged saved states and adapters, two writers on one session, bad --session paths."""

import warnings

import pytest
import torch
from tiny_models import ids, randomise_memory, tiny_base

import allmem


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
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

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
    from allmem.cache import CacheFileError

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
    from safetensors import safe_open

    from allmem.cache import CacheFileError

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
    from safetensors.torch import save_file

    from allmem.cache import CacheFileError

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
    from allmem.modeling import AdapterFileError

    model = randomise_memory(allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, chunk=4)))
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter.safetensors"
    _rewrite(weights, weights, lambda t: t["model.layers.0.self_attn.alpha"].fill_(float("nan")))
    target = allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, chunk=4))
    before = {n: p.detach().clone() for n, p in target.memory_parameters().items()}
    with pytest.raises(AdapterFileError, match=r"adapter\.safetensors holds NaN or Inf values \(in model\.layers\.0"):
        target.load_adapter(tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in target.memory_parameters().items())


def test_a_shipped_adapter_is_checked_against_its_sha256sums_once_per_process(tmp_path, monkeypatch):
    import hashlib

    import allmem.modeling as modeling

    model = randomise_memory(allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, chunk=4)))
    folder = tmp_path / "tiny-shipped"
    model.save_pretrained(folder)
    weights = folder / "adapter.safetensors"
    (folder / "SHA256SUMS").write_text(f"{hashlib.sha256(weights.read_bytes()).hexdigest()}  adapter.safetensors\n")
    monkeypatch.setitem(modeling.SHIPPED_ADAPTERS, "tiny-shipped", folder)
    monkeypatch.setattr(modeling, "_SHA256_SEEN", {})
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(modeling.hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))

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


def test_the_shipped_adapter_matches_its_sha256sums():
    from allmem.modeling import SHIPPED_ADAPTERS, verify_sha256sums

    verify_sha256sums(SHIPPED_ADAPTERS["smollm2-allmem"], required=True)
