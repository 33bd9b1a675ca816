"""The vLLM step planner (allmem.serving.batch_plan) on hand-made engine metadata, without vLLM."""

import pytest

from allmem.serving.batch_plan import RequestRun, plan_batch


def test_decodes_are_batched_and_prompts_and_prefill_chunks_run_alone():
    # five requests back to back: a decode, a fresh 4-token prompt, a 3-token chunk of a prompt
    # that already ran 5 tokens, a fresh 1-token prompt, a decode; then one with nothing this step
    starts = [0, 1, 5, 8, 9, 10, 10]
    seq_lens = [13, 4, 8, 1, 40, 7]
    slots = [3, 0, 5, 2, 7, 1]
    first_positions = [12, 0, 5, 0, 39, 7]
    plan = plan_batch(starts, seq_lens, slots, first_positions)
    assert plan.decodes == [RequestRun(0, 1, 3, 12), RequestRun(9, 10, 7, 39)]
    assert plan.prefills == [RequestRun(1, 5, 0, 0), RequestRun(5, 8, 5, 5), RequestRun(8, 9, 2, 0)]
    assert [run.fresh for run in plan.prefills] == [True, False, True]  # a chunk continues from its slot
    assert plan.trace() == [[12, 1], [0, 4], [5, 3], [0, 1], [39, 1]]
    # every token of the batch is run exactly once
    covered = sorted(t for run in plan.decodes + plan.prefills for t in range(run.begin, run.end))
    assert covered == list(range(10))


def test_a_state_that_does_not_hold_the_tokens_before_is_an_error():
    with pytest.raises(RuntimeError, match="request 1: first position 3 but 0 tokens seen"):
        plan_batch([0, 1, 3], [9, 2], [0, 1], [8, 3])
    with pytest.raises(ValueError, match="batch metadata disagrees"):
        plan_batch([0, 1, 3], [9, 2], [0], [8, 0])


def test_the_planner_does_not_need_vllm():
    import subprocess
    import sys

    code = ("import sys; import allmem.serving.batch_plan; "
            "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
