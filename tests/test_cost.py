"""The analytic cost model (allmem.cost) against hand arithmetic, the paper's claim, and the
real converted model: AllMemCache.nbytes(), memory_parameters() and torch's FLOP counter; its
report and command line (allmem.cost_report)."""

import argparse
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import allmem
from allmem import AllMemConfig, cost, cost_report
from allmem.cli import main
from tiny_models import tiny_base

# hidden 8, 1 layer, 2 query heads, 1 kv head, head_dim 4, MLP 16, vocab 10
SMALL = dict(name="small", hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=4, intermediate_size=16, vocab_size=10)
with pytest.warns(UserWarning, match="chunk"):  # chunk > window: fine for counting by hand
    SMALL_SETTING = AllMemConfig(window=2, sinks=1, chunk=4)  # memory: H = 1, d_h = 4, D = 4, F = 4, K = 4


def test_pairs_by_hand():
    # full, L = 6: 1 + 2 + ... + 6 = 21
    assert cost.attention_pairs(6) == 21
    # W = 2, S = 1, queries t = 0..5: window keys min(t + 1, 2) = 1, 2, 2, 2, 2, 2 (11); sink 0 has
    # left the window for t >= 2 (t = 2..5: 4) -> 15
    assert cost.attention_pairs(6, 2, 1) == 15
    # the 6th token sees min(6, 2) = 2 window keys + the sink -> 3
    assert cost.decode_pairs(6, 2, 1) == 3 and cost.decode_pairs(6) == 6
    # prefill pairs are the sum of decode pairs, for any window / sinks
    for window, sinks in [(None, 0), (5, 0), (5, 3), (7, 20)]:
        for length in range(1, 40):
            assert cost.attention_pairs(length, window, sinks) == sum(
                cost.decode_pairs(n, window, sinks) for n in range(1, length + 1))


def test_flops_by_hand():
    t = cost.per_token_flops(SMALL, SMALL_SETTING)
    # attention projections: 2 d (2 H_q d_k + 2 H_kv d_k) = 2*8*(16 + 8) = 384
    # per key: 4 H_q d_k = 4*2*4 = 32; MLP 6 d I = 6*8*16 = 768; LM head 2 d V = 2*8*10 = 160
    # memory per token: q,k,v,gate,o 2*8*4*5 = 320; eta, beta 4*8*1 = 32; conv 6*4*4 = 96;
    #   read 6 H F d_h = 6*1*4*4 = 96 -> 544; per written key 14*1*4*4 = 224
    assert t == {"attn_proj": 384, "attn_per_key": 32, "mlp": 768, "lm_head": 160,
                 "memory_per_token": 544, "memory_per_written_key": 224}
    full = cost.flops(SMALL, 6, SMALL_SETTING, arch="full")
    assert full["attn_proj"] == 6 * 384 == 2304
    assert full["attn_core"] == 21 * 32 == 672
    assert full["mlp"] == 6 * 768 and full["lm_head"] == 6 * 160
    assert full["total"] == 2304 + 672 + 4608 + 960
    swa = cost.flops(SMALL, 6, SMALL_SETTING, arch="swa")
    assert swa["attn_core"] == 15 * 32 == 480 and swa["memory"] == 0
    mem = cost.flops(SMALL, 6, SMALL_SETTING, arch="allmem")
    # 6 tokens read (6*544 = 3264), one full chunk of 4 written (4*224 = 896); tokens 5, 6 buffered
    assert mem["memory"] == 3264 + 896 == 4160
    assert mem["mixer"] == 2304 + 480 + 4160 and mem["rest"] == full["rest"]
    dec = cost.flops(SMALL, 6, SMALL_SETTING, arch="allmem", phase="decode")
    # one token: 384 + 3*32 + (544 + 224 amortised) + 768 + 160
    assert dec["total"] == 384 + 96 + 768 + 768 + 160
    assert cost.flops(SMALL, 6, SMALL_SETTING, arch="full", phase="decode")["attn_core"] == 6 * 32


def test_cache_by_hand_and_growth():
    # full: 2 * L * H_kv * d_k * 2 bytes = 2*6*1*4*2 = 96; SWA: min(6, S + W = 3) tokens -> 48
    assert cost.cache_bytes(SMALL, 6, SMALL_SETTING, arch="full")["total"] == 96
    assert cost.cache_bytes(SMALL, 6, SMALL_SETTING, arch="swa")["total"] == 48
    # AllMem: window 2*3*4*2 = 48; state, kept in float32 whatever the model dtype:
    # (2*3*1*4*4 + 2*1*4*4 + 2*1*4 + 3*3*4) * 4 = (96+32+8+36)*4 = 688; index (3 + 1 + 1) * 8 = 40 -> 776
    assert cost.cache_bytes(SMALL, 6, SMALL_SETTING, arch="allmem") == {
        "kv": 48, "memory_state": 688, "index": 40, "total": 776}
    assert cost.cache_bytes(SMALL, 6, SMALL_SETTING, arch="allmem", state_bytes=2)["memory_state"] == 344
    qwen = cost_report.load_model_config("qwen3-0.6b")
    lengths = [4096 * 2**i for i in range(6)]
    full = [cost.cache_bytes(qwen, n, arch="full")["total"] for n in lengths]
    # 28 layers * 2 * 8 kv heads * 128 * 2 bytes = 112 KiB per token, exactly linear
    assert all(f == n * 28 * 2 * 8 * 128 * 2 for f, n in zip(full, lengths))
    mem = {cost.cache_bytes(qwen, n)["total"] for n in [1, 100, *lengths, 10**6]}
    assert len(mem) == 1, "AllMem's cache must not depend on the length"


def test_paper_ratio_at_128k():
    """Paper: window 4096, chunk 2048, at 128k the cost is about 1/9 of full attention."""
    paper = AllMemConfig(window=4096, sinks=64, chunk=2048)
    rows = {m: cost_report.cost_table(cost_report.load_model_config(m), [131072], paper)[0]
            for m in ("qwen3-0.6b", "qwen3-1.7b")}
    for m, r in rows.items():
        print(f"{m} @128k AllMem/full: prefill mixer {r['prefill_mixer_ratio']:.4f} (1/{1 / r['prefill_mixer_ratio']:.1f}), "
              f"decode mixer {r['decode_mixer_ratio']:.4f}, cache {r['cache_ratio']:.4f} (1/{1 / r['cache_ratio']:.1f})")
    r = rows["qwen3-0.6b"]
    assert 1 / 11 < r["prefill_mixer_ratio"] < 1 / 8  # measured 0.108 = 1/9.3
    assert r["cache_ratio"] < 1 / 9  # ours is smaller than the paper's 1/9: 1/19.8
    assert r["decode_mixer_ratio"] < r["prefill_mixer_ratio"]
    assert rows["qwen3-1.7b"]["prefill_mixer_ratio"] < 1 / 5  # 1/6.8: the memory projections grow with d


def test_config_sources_agree(tmp_path):
    base = tiny_base("qwen3")
    as_dict = {k: getattr(base.config, k) for k in SMALL if k != "name"}
    assert cost.model_shape(base.config, "x") == cost.model_shape(as_dict, "x")
    assert cost_report.load_model_config("smollm2")["hidden_size"] == 576
    assert cost_report.load_model_config("Qwen/Qwen3-1.7B")["intermediate_size"] == 6144
    base.config.save_pretrained(tmp_path)  # a local model directory and its config.json
    from_dir = cost.model_shape(cost_report.load_model_config(str(tmp_path)), "x")
    assert from_dir == cost.model_shape(cost_report.load_model_config(str(tmp_path / "config.json")), "x")
    assert from_dir == cost.model_shape(base.config, "x")
    with pytest.raises(FileNotFoundError, match="bundled name"):
        cost_report.load_model_config("no-such-model")


def test_only_the_ttt_memory_is_counted():
    """A Mamba-2 baseline config has another memory: counting it as TTT would be silently wrong."""
    mamba = AllMemConfig(window=2, sinks=1, chunk=2, memory_type="mamba2")
    with pytest.raises(ValueError, match="memory_type='ttt'"):
        cost.flops(SMALL, 6, mamba, arch="allmem")
    with pytest.raises(ValueError, match="memory_type='ttt'"):
        cost.cache_bytes(SMALL, 6, mamba, arch="allmem")
    with pytest.raises(ValueError, match="memory_type='ttt'"):
        cost.memory_parameter_count(SMALL, mamba)
    # full attention and SWA do not involve the memory
    assert cost.flops(SMALL, 6, mamba, arch="swa")["attn_core"] == cost.attention_pairs(6, 2, 1) * 32
    assert cost.cache_bytes(SMALL, 6, mamba, arch="full")["total"] == 96


@pytest.fixture(scope="module")
def tiny_run():
    """A tiny converted qwen3: prefill 44 tokens into a cache, then decode 4 tokens, each
    under torch's FLOP counter (44 = 5 chunks of 8 + 4 buffered: the 4th step writes)."""
    config = allmem.AllMemConfig(window=16, sinks=4, chunk=8)
    model = allmem.convert(tiny_base("qwen3"), config).eval()
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    # the blocked kernel, whose count the cost model bounds (without gradients CPU would take the fused
    # window-mask kernel, which spends all T x K pairs at lengths this short)
    with torch.no_grad(), FlopCounterMode(display=False) as prefill, pytest.MonkeyPatch.context() as env:
        env.setenv("ALLMEM_SWA_BACKEND", "blocked")
        model(ids[:, :44], cache=cache)
    prefill_bytes = cache.nbytes()
    with torch.no_grad(), FlopCounterMode(display=False) as decode:
        for i in range(44, 48):
            model(ids[:, i:i + 1], cache=cache)
    return dict(model=model, config=config, ids=ids, prefill_bytes=prefill_bytes, decode_bytes=cache.nbytes(),
                prefill=prefill.get_flop_counts(), decode=decode.get_flop_counts())


def test_cache_bytes_and_parameters_equal_the_real_model(tiny_run):
    model, config = tiny_run["model"], tiny_run["config"]
    # tiny qwen3: d 64, 2 layers, 4 heads, 2 kv heads, head_dim 16 -> memory H 2, d_h 16, D 32, e 1, K 4
    # per layer, float32: sinks + ring 2*(4 + 16)*2*16 = 1280; weights + momentum 2*3*2*16*16 = 3072;
    #   partial chunk k, v 2*2*8*16 = 512, eta, beta 2*2*8 = 32; conv 3*3*32 = 288 -> 5184 * 4 = 20736
    #   int64: 20 slot positions + fill = 21 * 8 = 168 -> 20904; 2 layers + seen (8) = 41816
    expected = cost.cache_bytes(model.config, 44, config, dtype_bytes=4)["total"]
    assert expected == 41816
    short = model.new_cache()  # shorter than the window: the same size
    with torch.no_grad():
        model(tiny_run["ids"][:, :10], cache=short)
    assert short.nbytes() == tiny_run["prefill_bytes"] == tiny_run["decode_bytes"] == expected
    # parameters per layer: 5*64*32 = 10240 (q,k,v,gate,o) + 3*32*4 = 384 (conv) + 64 (q/k norms)
    #   + 2*(64*2 + 2) = 260 (eta, beta) + 3*2*16*16 = 1536 (W0) + 32 (out norm) + 64 (alpha) = 12580; x2 layers
    real = sum(p.numel() for p in model.memory_parameters().values())
    assert real == cost.memory_parameter_count(model.config, config) == 25160


def _by_module(counts, suffixes):
    return sum(sum(v.values()) for k, v in counts.items() if k.endswith(suffixes))


def test_flops_equal_torch_flop_counter(tiny_run):
    """Every counted matmul of the real forward: prefill of 44 tokens, then 4 decode steps."""
    model, config, counts = tiny_run["model"], tiny_run["config"], tiny_run["prefill"]
    pred = cost.flops(model.config, 44, config, arch="allmem")
    projections = tuple(f"self_attn.attn.{p}_proj" for p in "qkvo")
    assert _by_module(counts, ("self_attn.memory",)) == pred["memory"]
    assert _by_module(counts, projections) == pred["attn_proj"]
    assert _by_module(counts, (".mlp",)) == pred["mlp"]
    assert _by_module(counts, ("lm_head",)) == pred["lm_head"]
    # the blocked SWA kernel computes whole query blocks: at least the ideal pairs, at most 2.5x
    core = sum(counts["Global"].values()) - (pred["total"] - pred["attn_core"])
    assert pred["attn_core"] <= core <= 2.5 * pred["attn_core"]
    # decode: 4 reads, and the 4th step writes the chunk of 8 (4 buffered + 4 new), in both layers;
    # over a whole chunk this is C x the amortised per-token cost of cost.flops(phase="decode")
    t = cost.per_token_flops(model.config, config)
    layers = model.config.num_hidden_layers
    expected = layers * (4 * t["memory_per_token"] + 8 * t["memory_per_written_key"])
    # one-token steps do the depthwise conv as a weighted sum (elementwise: the counter does not
    # see it), the cost model counts its 2 K 3D FLOPs per token
    memory = model.model.layers[0].self_attn.memory
    conv = 2 * memory.conv_kernel * 3 * memory.width
    assert _by_module(tiny_run["decode"], ("self_attn.memory",)) == expected - layers * 4 * conv
    step = cost.flops(model.config, 48, config, arch="allmem", phase="decode")["memory"]
    assert 8 * step == layers * 8 * (t["memory_per_token"] + t["memory_per_written_key"])


def test_table_markdown_and_cli(tmp_path, capsys):
    rows = cost_report.cost_table(cost_report.load_model_config("smollm2"), [4096, 8192],
                                  AllMemConfig(window=1024, sinks=4, chunk=512))
    assert [r["length"] for r in rows] == [4096, 8192] and rows[0]["model"] == "SmolLM2-135M"
    text = cost_report.format_cost_table(rows)
    assert text.count("\n| SmolLM2-135M |") == 2 and "window 1024, sinks 4, chunk 512" in text

    parser = argparse.ArgumentParser(prog="allmem")
    cost_report.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["cost", "--help"])
    assert done.value.code == 0 and "--config" in capsys.readouterr().out
    md = tmp_path / "cost.md"
    args = parser.parse_args(["cost", "--config", "qwen3-0.6b", "smollm2", "--lengths", "4096", "131072",
                              "--markdown", str(md)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out == md.read_text()
    assert out.count("| Qwen3-0.6B |") == 2 and out.count("| SmolLM2-135M |") == 2


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = {m: cost_report.cost_table(cost_report.load_model_config(m), [4096, 16384]) for m in ("qwen3-0.6b",)}
    path = cost_report.plot_cost(rows, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert path == tmp_path / "fig.png"


@pytest.mark.parametrize("args, message", [
    (["--window", "0"], "window must be a positive integer"),
    (["--chunk", "-3"], "chunk must be a positive integer"),
    (["--memory-heads", "0"], "memory_heads must be None or a positive integer"),
    (["--lengths", "4096", "0"], "--lengths must be positive token counts, got [0]"),
    (["--config", "no-such-model"], "give a bundled name"),
    (["--config", "list.json"], "holds a JSON list, not a model config object"),
    (["--config", "partial.json"], "model config lacks ['num_hidden_layers'"),
], ids=["window", "chunk", "memory-heads", "lengths", "unknown-model", "json-list", "json-missing-keys"])
def test_cli_bad_input_is_one_error_line_and_exit_2(args, message, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "partial.json").write_text('{"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16, '
                                           '"vocab_size": 10}')
    args = [str(tmp_path / a) if a.endswith(".json") else a for a in args]
    if "--config" not in args:
        args = ["--config", "qwen3-0.6b", *args]
    assert main(["cost", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_cli_bad_input_exit_code_of_the_process():
    done = subprocess.run([sys.executable, "-m", "allmem.cli", "cost", "--config", "qwen3-0.6b", "--sinks", "-1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: sinks must be an integer >= 0") and "Traceback" not in done.stderr
