"""Perplexity by position and the systems' per-token NLLs, against direct computations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from allmem.eval import ppl as ppl_mod
from allmem.eval.ppl import bucket_edges, bucket_label, bucket_sums, run_ppl, token_windows
from allmem.eval.systems import SystemSpecError, load_system, parse_spec, slug

TEXT = " ".join(f"Line {i}: the quick brown fox number {i * 7 % 13} jumps over the lazy dog." for i in range(60))


@pytest.fixture(scope="module")
def systems(tiny_smollm_dir):
    root = str(tiny_smollm_dir)
    return {
        "full": load_system(f"full:{root}?segment=24"),
        "swa": load_system(f"swa:{root}?window=16&sinks=2&chunk=8&segment=20"),
        "allmem": load_system(f"allmem:{root}?window=16&sinks=2&chunk=8&segment=13"),
    }


def _direct_nll(model_forward, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model_forward(torch.tensor([ids])).float()[0, :-1]
    return -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].double()


def test_bucket_arithmetic():
    assert bucket_edges(1000) == [(0, 256), (256, 512), (512, 1000)]
    assert bucket_edges(16384)[-1] == (8192, 16384)
    assert bucket_edges(100, [10, 50]) == [(0, 10), (10, 50), (50, 100)]
    assert bucket_label(8192, 16384) == "[8k, 16k)" and bucket_label(0, 256) == "[0, 256)"
    nll = torch.arange(1, 11, dtype=torch.float64)  # positions 1..10
    sums = bucket_sums(nll, bucket_edges(11, [0, 4, 8]))
    # [0,4): positions 1,2,3 -> 1+2+3; [4,8): 4..7; [8,11): 8,9,10
    assert sums == [(6.0, 3), (22.0, 4), (27.0, 3)]


def test_full_system_nlls_match_one_forward(systems):
    full = systems["full"]
    ids = full.encode(TEXT)[:100]
    direct = _direct_nll(lambda x: full.model(x).logits, ids)
    scores = full.token_scores(ids)  # 24-token segments with the KV cache
    torch.testing.assert_close(scores.nll, direct, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        argmax = full.model(torch.tensor([ids])).logits[0, :-1].argmax(-1)
    assert torch.equal(scores.greedy, argmax == torch.tensor(ids[1:]))


@pytest.mark.parametrize("kind", ["allmem", "swa"])
def test_converted_nlls_segment_by_segment_equal_one_forward(systems, kind):
    system = systems[kind]
    ids = system.encode(TEXT)[:64]
    if kind == "allmem":  # a memory that really contributes (alpha != 0)
        with torch.no_grad():
            for layer in system.model.model.layers:
                layer.self_attn.alpha.fill_(0.5)
    direct = _direct_nll(lambda x: system.model(x, use_cache=False).logits, ids)  # one forward, no cache
    torch.testing.assert_close(system.token_nlls(ids), direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(system.token_nlls(torch.tensor([ids])), direct, atol=1e-4, rtol=1e-4)


def test_swa_skipping_memory_is_exactly_memory_disabled(tiny_smollm_dir):
    root = str(tiny_smollm_dir)
    fast = load_system(f"swa:{root}?window=16&sinks=2&chunk=16&segment=20")
    slow = load_system(f"swa:{root}?window=16&sinks=2&chunk=16&segment=20&skip_memory=0")
    reference = load_system(f"allmem:{root}?window=16&sinks=2&chunk=16&segment=20")
    ids = fast.encode(TEXT)[:48]
    with reference.model.memory_disabled():
        expected = reference.token_nlls(ids)
    assert torch.equal(fast.token_nlls(ids), expected)
    assert torch.equal(slow.token_nlls(ids), expected)
    assert fast.generate(TEXT[:120], 4) == slow.generate(TEXT[:120], 4)


def test_run_ppl_buckets_match_direct_computation(tmp_path, systems, monkeypatch):
    full, swa = systems["full"], systems["swa"]
    length, edges = 64, [0, 16, 40]
    result = run_ppl([full, swa], tmp_path, lengths=[length], edges=edges, text=TEXT, docs=2, progress=False)
    windows = token_windows(full.tokenizer, TEXT, length, 2)
    assert windows[1][0] == full.tokenizer(TEXT, add_special_tokens=False).input_ids[length]
    for system in (full, swa):
        nll = torch.cat([system.token_nlls(w) for w in windows])
        pos = torch.cat([torch.arange(1, length)] * 2)
        expected = {
            "[0, 16)": math.exp(float(nll[pos < 16].mean())),
            "[16, 40)": math.exp(float(nll[(pos >= 16) & (pos < 40)].mean())),
            "[40, 64)": math.exp(float(nll[pos >= 40].mean())),
            "all": math.exp(float(nll.mean())),
        }
        assert result.ppl[system.name] == pytest.approx({k: round(v, 2) for k, v in expected.items()}, abs=0.011)
        assert result.tokens[system.name] == {"[0, 16)": 30, "[16, 40)": 48, "[40, 64)": 48}
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    assert "| [16, 40) |" in (tmp_path / "ppl.md").read_text()
    assert json.loads((tmp_path / "ppl.json").read_text())["ppl"] == result.ppl

    # resume: the saved NLLs are reused, no system is loaded or run again
    monkeypatch.setattr(ppl_mod, "load_system", lambda spec: pytest.fail("loaded a system on resume"))
    names = [full.name, swa.name]
    for system in (full, swa):
        monkeypatch.setattr(system, "token_nlls", lambda ids, **kw: pytest.fail("recomputed NLLs"))
    again = run_ppl([full, swa], tmp_path, lengths=[length], edges=[0, 32], text=TEXT, docs=2, progress=False,
                    plot=False)
    assert list(again.ppl) == names and again.ppl[full.name]["all"] == result.ppl[full.name]["all"]
    with pytest.raises(ValueError, match="other settings"):
        run_ppl([full], tmp_path, lengths=[32], text=TEXT, progress=False)


def test_token_windows_and_text_sources(systems):
    tok = systems["full"].tokenizer
    with pytest.raises(ValueError, match="fewer than"):
        token_windows(tok, "short text", 100)
    assert len(ppl_mod.load_text("heldout")) > 100_000
    with pytest.raises(ValueError, match="unknown text source"):
        ppl_mod.load_text("wikipedia")


def test_spec_parsing_and_errors(tiny_smollm_dir):
    spec = parse_spec("swa:smollm2?window=256&sinks=4")
    assert (spec.kind, spec.target, spec.options) == ("swa", "smollm2", {"window": "256", "sinks": "4"})
    assert parse_spec("full:/a/b?name=base").name == "base"
    assert slug("swa:smollm2?window=256&sinks=4") == "swa_smollm2_window_256_sinks_4"
    for bad in ("smollm2", "gpt:x", "full:", "swa:x?window", "swa:x?window=1&window=2"):
        with pytest.raises(SystemSpecError):
            parse_spec(bad)
    root = str(tiny_smollm_dir)
    with pytest.raises(SystemSpecError, match="unknown option"):
        load_system(f"full:{root}?window=16")
    with pytest.raises(SystemSpecError, match="unknown option"):
        load_system(f"allmem:{root}?skip_memory=1")
    with pytest.raises(SystemSpecError, match="integer"):
        load_system(f"allmem:{root}?window=big")


def test_adapter_spec_and_runtime_overrides(tmp_path, tiny_smollm_dir):
    root = str(tiny_smollm_dir)
    system = load_system(f"allmem:{root}?window=16&sinks=2&chunk=8")
    system.model.save_pretrained(tmp_path / "adapter")
    again = load_system(f"allmem:{tmp_path / 'adapter'}?window=32&segment=10")
    assert again.model.allmem_config.window == 32 and again.model.allmem_config.chunk == 8
    with pytest.raises(SystemSpecError, match="fixes"):
        load_system(f"allmem:{tmp_path / 'adapter'}?expansion=2")
    with pytest.raises(SystemSpecError, match="not an adapter"):
        load_system(f"full:{tmp_path / 'adapter'}")


def test_mamba2_spec(tiny_smollm_dir):
    spec = f"mamba2:{tiny_smollm_dir}?window=16&sinks=2&chunk=8"
    system = load_system(spec)
    assert system.model.allmem_config.memory_type == "mamba2"
    ids = system.encode(TEXT)[:40]
    assert system.token_nlls(ids).shape == (39,)


@pytest.mark.real_model
def test_real_smollm2_swa_with_long_window_is_full_attention():
    swa = load_system("swa:smollm2?window=128&sinks=4&segment=48")
    ids = swa.encode(TEXT)[:96]
    with swa.model.original_attention() as base:  # the pretrained model, full attention
        direct = _direct_nll(lambda x: base(x).logits, ids)
    torch.testing.assert_close(swa.token_nlls(ids), direct, atol=2e-3, rtol=1e-3)


def test_saved_nlls_are_safetensors_and_no_pickle_is_read(tmp_path, systems, monkeypatch):
    """Per-window NLLs are written as safetensors; resume reads them without torch.load (no pickle)."""
    from safetensors.torch import load_file

    full = systems["full"]
    run_ppl([full], tmp_path, lengths=[32], text=TEXT, docs=1, progress=False, plot=False)
    files = sorted((tmp_path / "nll").iterdir())
    assert [f.suffix for f in files] == [".safetensors"]
    assert load_file(str(files[0]))["nll"].shape == (31,)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load on resume"))
    monkeypatch.setattr(full, "token_nlls", lambda ids, **kw: pytest.fail("recomputed NLLs"))
    run_ppl([full], tmp_path, lengths=[32], text=TEXT, docs=1, progress=False, plot=False)
    files[0].write_bytes(b"garbage")
    with pytest.raises(ValueError, match="delete it and rerun"):
        run_ppl([full], tmp_path, lengths=[32], text=TEXT, docs=1, progress=False, plot=False)
