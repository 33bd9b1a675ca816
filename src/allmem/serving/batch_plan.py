"""How one vLLM engine step's flattened batch is run through the AllMem mixers (no vLLM import).

vLLM hands every step the requests' tokens back to back (``query_start_loc``), each request's
length after the step (``seq_lens``) and its state slot. A request with one new token and some
history (a decode, or a 1-token chunk of a chunked prefill) joins the step's one batched
one-token run; every other request (a prompt, or one chunk of a longer prompt) runs alone through
the segment path, from a fresh state when it has seen nothing yet (its slot may still hold a
finished request's state, so it is never read), else from its slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRun:
    """One request's part of the step: tokens [begin, end) of the flattened batch, its state slot
    and how many of its tokens earlier steps already ran."""

    begin: int
    end: int
    slot: int
    seen: int

    @property
    def fresh(self) -> bool:
        return self.seen == 0


@dataclass
class BatchPlan:
    decodes: list[RequestRun]
    """Run together, one token each."""
    prefills: list[RequestRun]
    """Each run alone."""

    def trace(self) -> list[list[int]]:
        """[tokens seen before, new tokens] per request, in batch order (ALLMEM_VLLM_TRACE)."""
        runs = sorted(self.decodes + self.prefills, key=lambda run: run.begin)
        return [[run.seen, run.end - run.begin] for run in runs]


def plan_batch(query_start_loc: list[int], seq_lens: list[int], slots: list[int],
               first_positions: list[int]) -> BatchPlan:
    """Split a step's requests into the batched decodes and the lone prefills.

    query_start_loc: B + 1 offsets into the flattened batch; seq_lens: B lengths after this step;
    slots: B state slots; first_positions: B positions of each request's first new token, which
    must equal the tokens it has seen (the state holds exactly those). Requests with no tokens
    this step are skipped."""
    if not len(query_start_loc) - 1 == len(seq_lens) == len(slots) == len(first_positions):
        raise ValueError(f"batch metadata disagrees: {len(query_start_loc) - 1} requests by query_start_loc, "
                         f"{len(seq_lens)} seq_lens, {len(slots)} slots, {len(first_positions)} first positions")
    plan = BatchPlan(decodes=[], prefills=[])
    for r, (begin, end) in enumerate(zip(query_start_loc[:-1], query_start_loc[1:])):
        length = end - begin
        if length <= 0:
            continue
        seen = seq_lens[r] - length
        if first_positions[r] != seen:
            raise RuntimeError(f"request {r}: first position {first_positions[r]} but {seen} tokens seen")
        run = RequestRun(begin=begin, end=end, slot=slots[r], seen=seen)
        (plan.decodes if length == 1 and seen > 0 else plan.prefills).append(run)
    return plan
