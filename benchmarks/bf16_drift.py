"""bf16 vs float32 logits of the real converted model over a long stream (issue 13).

The same AllMem model (default: the shipped smollm2-allmem) is loaded twice, in float32 and
in bfloat16 (its fast weights, momentum and chunk buffer stay float32 either way), and both
read the same held-out text segment by segment through their constant-size caches. Per
position bucket it reports the mean |logit difference| (mean over the vocabulary), its 99th
percentile over positions, and how often the two pick the same top-1 token; then the same
with the memory off (alpha = 0: SWA + sinks), which is the floor set by bf16 attention and
MLP alone. A drift that grows with position beyond that floor is state error accumulating.

    .venv/bin/python benchmarks/bf16_drift.py --tokens 32768 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

import allmem
from allmem.corpus import long_document, stdlib_source


def held_out_ids(tokenizer, tokens: int) -> torch.Tensor:
    text = stdlib_source() + "\n\n" + long_document()  # stdlib source is never trained on
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"error: only {ids.shape[1]} tokens of held-out text; ask for --tokens {ids.shape[1]} or fewer")
    return ids


def drift_by_position(ref, low, ids: torch.Tensor, segment: int, memory: bool, progress: bool) -> list[dict]:
    """Per segment: mean/p99 |logit diff| and top-1 agreement between the float32 and bf16 twins."""
    rows = []
    ref_cache, low_cache = ref.new_cache(), low.new_cache()
    off = (ref.memory_disabled(), low.memory_disabled()) if not memory else (nullcontext(), nullcontext())
    with torch.no_grad(), off[0], off[1]:
        for start in tqdm(range(0, ids.shape[1], segment), desc=f"memory {'on' if memory else 'off'}",
                          disable=not progress):
            x = ids[:, start:start + segment]
            a = ref(x, cache=ref_cache).logits[0].float()
            b = low(x, cache=low_cache).logits[0].float()
            per_token = (a - b).abs().mean(-1)
            rows.append({"start": start, "end": start + x.shape[1], "mean_abs": float(per_token.mean()),
                         "p99_abs": float(per_token.quantile(0.99)),
                         "top1_agree": float((a.argmax(-1) == b.argmax(-1)).double().mean())})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-allmem", help="adapter name or folder (default smollm2-allmem)")
    parser.add_argument("--tokens", type=int, default=32768, help="stream length (default 32768)")
    parser.add_argument("--segment", type=int, default=2048, help="tokens per forward call (default 2048)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for bf16_drift.{json,md}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.segment < 1:
        parser.error("--tokens and --segment must be positive")

    t0 = time.perf_counter()
    ref = allmem.from_pretrained(args.model, dtype=torch.float32).eval()
    low = allmem.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    ids = held_out_ids(ref.tokenizer, args.tokens)
    result = {"model": args.model, "tokens": args.tokens, "segment": args.segment, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    for memory in (True, False):
        result["memory_on" if memory else "memory_off"] = drift_by_position(ref, low, ids, args.segment, memory,
                                                                             not args.quiet)
    result["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_drift.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# bf16 vs float32 logits, {args.model}, {args.tokens} held-out tokens ({result['minutes']} min)\n",
             "Mean |logit difference| over the vocabulary, averaged over each segment's positions (p99 over "
             "positions in brackets), and top-1 agreement; memory off = alpha 0 (SWA + sinks), the bf16 floor.\n",
             "| positions | memory on: mean (p99) | top-1 | memory off: mean (p99) | top-1 | on / off |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for on, off in zip(result["memory_on"], result["memory_off"]):
        ratio = on["mean_abs"] / off["mean_abs"] if off["mean_abs"] > 0 else math.inf
        lines.append(f"| {on['start']}-{on['end'] - 1} | {on['mean_abs']:.4f} ({on['p99_abs']:.4f}) | "
                     f"{100 * on['top1_agree']:.1f} % | {off['mean_abs']:.4f} ({off['p99_abs']:.4f}) | "
                     f"{100 * off['top1_agree']:.1f} % | {ratio:.2f} |")
    (args.out / "bf16_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
