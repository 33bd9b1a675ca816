"""Sessions: one constant-size state across chat turns, saved and resumed exactly
(`allmem chat --session`), and `allmem read FILE` in bounded memory."""

import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import allmem
from allmem.cli import main
from allmem.session import Session, SessionError, TurnTemplate, iter_text_blocks
from allmem.streaming import Sampling, continue_text, ingest

QUESTION = "Where is the key?"


def _model(adapter):
    model = allmem.from_pretrained(adapter)
    return model, model.tokenizer


def test_turn_template_pieces_rebuild_the_tokenizers_own_rendering():
    _, tok = allmem.load_base("smollm2")
    t = TurnTemplate.from_tokenizer(tok)
    conversation = [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "an answer"},
                    {"role": "user", "content": "second?"}]
    pieced = t.first_prefix + "first?" + t.suffix + "an answer" + t.next_prefix + "second?" + t.suffix
    assert pieced == tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_chat_session_resumed_in_another_process_continues_exactly(tiny_adapter, tmp_path):
    questions = ["Where is the key?", "And the lock?", "Say it again."]
    model, tok = _model(tiny_adapter)
    reference = Session(model, tok)
    replies = [reference.ask(q, max_new_tokens=6) for q in questions]
    assert reference.turns == 3 and reference.phase == "closed"

    first = Session(model, tok)
    assert first.ask(questions[0], max_new_tokens=6) == replies[0]
    path = tmp_path / "chat.safetensors"
    first.save(path)
    size_after_one_turn = path.stat().st_size

    # a later process continues the conversation from the file, with another number of CPU threads
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8",
           "OMP_NUM_THREADS": "1" if torch.get_num_threads() != 1 else "2"}
    out = subprocess.run(  # bytes, not text: a generated "\r" must not become "\n"
        [sys.executable, "-m", "allmem.cli", "chat", "--model", str(tiny_adapter), "--session", str(path),
         "--max-new-tokens", "6"],
        input=("\n".join(questions[1:]) + "\n").encode(), capture_output=True, env=env, timeout=600, check=True,
    )
    assert "resumed" in out.stderr.decode() and "1 turns" in out.stderr.decode()
    expected = "".join(f"you> {q}\nallmem> {r}\n" for q, r in zip(questions[1:], replies[1:]))
    assert out.stdout.decode("utf-8") == expected

    resumed = Session.load(path, model, tok)
    assert resumed.turns == 3 and resumed.tokens_read == reference.tokens_read
    saved, expected = resumed.cache.tensors(), reference.cache.tensors()
    assert saved.keys() == expected.keys()
    for name in expected:
        assert torch.equal(saved[name], expected[name]), name
    assert path.stat().st_size == size_after_one_turn  # the state did not grow with the turns


def test_read_streams_a_long_file_in_bounded_memory(tiny_adapter, tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:120_000]
    short, long_ = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text(text[:30_000], encoding="utf-8")
    long_.write_text(text, encoding="utf-8")

    blocks = list(iter_text_blocks(long_, block_chars=4096))
    assert "".join(blocks) == text and max(map(len, blocks)) <= 2 * 4096  # nothing lost, nothing held whole

    model, tok = _model(tiny_adapter)
    widths = []
    real_forward = type(model).forward

    def spy(self, input_ids=None, *args, **kwargs):
        widths.append(input_ids.shape[1])
        return real_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    sizes = {}
    for path in (short, long_):
        session = Session(model, tok, segment=256)
        tokens = session.read_file(path, progress=False)
        sizes[path.name] = (tokens, session.cache.nbytes())
    assert sizes["long.txt"][0] > 3 * sizes["short.txt"][0]
    assert sizes["long.txt"][1] == sizes["short.txt"][1]  # constant state whatever the length
    assert max(widths) <= 256  # never more than one segment per forward


def test_read_cli_saves_a_state_that_chat_and_ask_continue(tiny_adapter, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The vault code is 4921. " + "Filler sentence about nothing. " * 200, encoding="utf-8")
    state = tmp_path / "doc.safetensors"
    args = ["read", str(doc), "--model", str(tiny_adapter), "--session", str(state), "--quiet", "--max-new-tokens", "4"]
    assert main(args + ["--ask", "What is the vault code?"]) == 0
    model, tok = _model(tiny_adapter)
    session = Session.load(state, model, tok)
    assert session.turns == 1 and session.phase == "closed" and session.tokens_read > 1000

    # the same, by hand: read into an open user turn, then the question joins that turn
    by_hand = Session(model, tok)
    by_hand.read(doc.read_text(encoding="utf-8"))
    assert by_hand.phase == "open"
    by_hand.ask("What is the vault code?", max_new_tokens=4)
    for name, value in by_hand.cache.tensors().items():
        assert torch.equal(value, session.cache.tensors()[name]), name


def test_a_session_refuses_another_model_or_a_plain_cache(tiny_adapter, tiny_smollm_dir, tmp_path):
    model, tok = _model(tiny_adapter)
    session = Session(model, tok)
    session.ask("hello", max_new_tokens=2)
    path = tmp_path / "s.safetensors"
    session.save(path)

    other = allmem.convert(allmem.load_base(str(tiny_smollm_dir))[0], allmem.AllMemConfig(window=16, sinks=2, chunk=8))
    with pytest.raises(SessionError, match="another model or adapter"):
        Session.load(path, other, tok)

    plain = tmp_path / "plain.safetensors"
    session.cache.save(plain)
    with pytest.raises(SessionError, match="not a session file"):
        Session.load(plain, model, tok)
    assert main(["chat", "--model", str(tiny_adapter), "--session", str(plain)]) == 2


def test_the_main_job_runs_end_to_end_and_writes_its_report(tiny_adapter, tmp_path):
    from safetensors.torch import load_file

    from allmem.demo import DemoPlan, run_demo
    from allmem.eval.systems import slug

    plan = DemoPlan(stream_tokens=700, ppl_docs=1, long_lengths=(), passkey_lengths=(300,), passkey_depths=(0.2,),
                    passkey_samples=1, ppl_length=700)
    logged = []
    report = run_demo(str(tiny_adapter), tmp_path, plan, window=16, sinks=2, segment=128, progress=False,
                      log=logged.append)
    assert report["stream"]["state_bytes"] < report["stream"]["full_kv_bytes"]
    assert len(report["stream"]["answers"]) == 3
    assert set(report["ppl"]) == {"full attention", "SWA + sinks", "AllMem"}
    assert set(report["passkey"]) == {"full attention", "SWA + sinks", "AllMem"}
    for name in ("report.md", "report.json", "stream_memory.png", "passkey.png", "ppl/ppl.png", "state.safetensors"):
        assert (tmp_path / name).is_file(), name
    text = (tmp_path / "report.md").read_text()
    assert "Streaming a long document" in text and "Passkey" in text
    # the memory is on: AllMem and SWA + sinks differ
    assert report["ppl"]["AllMem"]["all"] != report["ppl"]["SWA + sinks"]["all"]
    # perplexity past position 512, straight from the saved per-token NLLs
    nll = {name: load_file(str(tmp_path / "ppl" / "nll" / f"{slug(name)}__700__0.safetensors"))["nll"].double()
           for name in report["ppl"]}
    for name, value in report["ppl_beyond_512"].items():
        assert value == pytest.approx(math.exp(float(nll[name][511:].mean())), abs=0.006)
    full, swa, mem = (report["ppl_beyond_512"][k] for k in ("full attention", "SWA + sinks", "AllMem"))
    assert report["gap_closed_beyond_512"] == pytest.approx((swa - mem) / (swa - full))
    # the three systems are one model: inside the window (16) SWA + sinks sees all that full
    # attention sees, so their token NLLs agree there, and past it they must not
    torch.testing.assert_close(nll["SWA + sinks"][:15], nll["full attention"][:15], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(nll["SWA + sinks"][100:], nll["full attention"][100:], atol=1e-3)
    # the streamed state is what was saved: it resumes at the same token count and size, and the
    # planted facts lie beyond the window
    stream = report["stream"]
    resumed = Session.load(tmp_path / "state.safetensors", *_model(tiny_adapter))
    assert resumed.tokens_read == stream["tokens"] >= plan.stream_tokens
    assert resumed.cache.nbytes() == stream["state_bytes"]
    for answer in stream["answers"]:
        assert answer["tokens_back"] > 16 and answer["correct"] == (answer["expected"].lower() in answer["answer"].lower())
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {k: saved[k] for k in ("ppl", "passkey")} == json.loads(json.dumps({k: report[k] for k in ("ppl", "passkey")}))
    assert all(0 <= score <= 100 for s in report["passkey"].values() for score in s["passkey"].values())


# ------------------------------------------------------------------ the one decode path
def test_every_caller_decodes_alike_and_cuts_at_a_stop_string(tiny_adapter, tmp_path, capsys, monkeypatch):
    """Session.ask, an eval system, `allmem generate --chat` (streamed and --quiet) and `allmem
    chat` decode the same prompt through streaming.continue_text: the same reply, and a stop
    string cuts it at the same place, in the streamed output too."""
    from allmem.eval.systems import load_system

    model, tok = _model(tiny_adapter)
    system = load_system(f"allmem:{tiny_adapter}")
    prompt = tmp_path / "question.txt"
    prompt.write_text(QUESTION, encoding="utf-8")

    def replies(stop: list[str]) -> dict[str, str]:
        options = ["--model", str(tiny_adapter), "--max-new-tokens", "12", *(a for s in stop for a in ("--stop", s))]
        got = {"session": Session(model, tok).ask(QUESTION, max_new_tokens=12, stop=stop),
               "system": system.generate(QUESTION, 12, chat=True, stop=stop)}
        for quiet in ([], ["--quiet"]):
            assert main(["generate", "--prompt-file", str(prompt), "--chat", *quiet, *options]) == 0
            got[f"generate {quiet}"] = capsys.readouterr().out.removesuffix("\n")
        monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n"))
        assert main(["chat", *options]) == 0
        got["chat"] = capsys.readouterr().out.removeprefix(f"you> {QUESTION}\nallmem> ").removesuffix("\n")
        return got

    free = replies([])
    reply = free["session"]
    assert len(reply) >= 6 and set(free.values()) == {reply}, free
    stop = reply[3:6]
    cut = replies([stop])
    assert set(cut.values()) == {reply[: reply.index(stop)]}, cut


def test_the_state_holds_the_whole_reply_but_no_end_token(tiny_adapter):
    """generate() never feeds its last token: continue_text(feed_last=True) does, so the state
    after a reply cut by length equals reading prompt and reply by hand; an end token is not fed."""
    model, tok = _model(tiny_adapter)
    ids = tok("The key is under the mat. Where is the key?", return_tensors="pt").input_ids

    def read_by_hand(tokens: list[int]):
        cache = ingest(model, ids[:, :-1], model.new_cache(), segment=4, progress=False)
        return ingest(model, torch.tensor([ids[0, -1:].tolist() + tokens]), cache, segment=1, progress=False)

    cache = model.new_cache()
    reply = continue_text(model, tok, ids, cache, max_new_tokens=5, segment=4, feed_last=True)
    assert len(reply.token_ids) == 5 and not reply.ended
    expected = read_by_hand(reply.token_ids).tensors()
    assert all(torch.equal(cache.tensors()[name], value) for name, value in expected.items())

    first = reply.token_ids[0]  # make the first reply token an end token: the reply is empty
    model.generation_config.eos_token_id = [tok.eos_token_id, first]
    cache = model.new_cache()
    ended = continue_text(model, tok, ids, cache, max_new_tokens=5, segment=4, feed_last=True)
    assert (ended.text, ended.token_ids, ended.ended) == ("", [first], True)
    expected = read_by_hand([]).tensors()
    assert all(torch.equal(cache.tensors()[name], value) for name, value in expected.items())


def test_sampling_repeats_with_the_seed_and_checks_its_settings(tiny_adapter):
    model, tok = _model(tiny_adapter)

    def sample(seed: int) -> str:
        torch.manual_seed(seed)
        return Session(model, tok).ask(QUESTION, max_new_tokens=8, sampling=Sampling(temperature=1.0, top_k=0))

    assert sample(0) == sample(0) != sample(1)
    assert sample(0) != Session(model, tok).ask(QUESTION, max_new_tokens=8)  # greedy
    for bad, match in (({"temperature": -1}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0}, "top_p")):
        with pytest.raises(ValueError, match=match):
            Sampling(**bad)
