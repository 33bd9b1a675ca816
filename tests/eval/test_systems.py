"""The typed system spec (built in code or read from the command line) and the systems'
generation through the one decode path."""

from __future__ import annotations

import pytest
import torch

import allmem
from allmem.eval.systems import FullAttentionSystem, SystemSpec, SystemSpecError, parse_spec


def test_command_line_options_become_typed_fields():
    spec = parse_spec("swa:smollm2?window=256&sinks=4&base_lr=0.05&clip=none&read_residual=0&segment=20"
                      "&skip_memory=0&dtype=bfloat16&name=SWA + sinks")
    assert spec == SystemSpec("swa", "smollm2", {"window": 256, "sinks": 4, "base_lr": 0.05, "clip": None,
                                                  "read_residual": False},
                              segment=20, dtype="bfloat16", skip_memory=False, label="SWA + sinks")
    assert spec.name == "SWA + sinks"
    assert parse_spec("full:smollm2").name == "full:smollm2" and parse_spec("full:smollm2").default_segment == 2048
    assert parse_spec("allmem:smollm2?segment=7").default_segment == 7


@pytest.mark.parametrize("spec", [
    SystemSpec("full", "smollm2", label="full attention"),
    SystemSpec("swa", "runs/adapter", {"window": 64, "sinks": 2}, label="SWA + sinks", skip_memory=False),
    SystemSpec("allmem", "smollm2", {"base_lr": 0.05, "clip": None, "positions": "absolute", "read_residual": False},
               segment=13, dtype="float16", label="AllMem (untrained) + a=b"),
    SystemSpec("mamba2", "/data/base", {"window": 16, "chunk": 8}),
])
def test_a_spec_round_trips_through_its_command_line_form_as_written(spec):
    text = str(spec)
    assert parse_spec(text) == spec and parse_spec(text).name == spec.name
    assert "%" not in text  # nothing is URL-escaped: a "+" in a name is written and read as "+"


def test_nothing_is_url_decoded():
    assert parse_spec("full:x?name=SWA %2B sinks").name == "SWA %2B sinks"
    assert parse_spec("full:x?name=a+b").name == "a+b"


@pytest.mark.parametrize("build, match", [
    (lambda: SystemSpec("gpt", "x"), "unknown system kind"),
    (lambda: SystemSpec("full", ""), "no model"),
    (lambda: SystemSpec("full", "x", {"window": 16}), "unknown option"),
    (lambda: SystemSpec("allmem", "x", {"windw": 16}), r"unknown option\(s\) \['windw'\]"),
    (lambda: SystemSpec("allmem", "x", skip_memory=True), "unknown option"),
    (lambda: SystemSpec("swa", "x", segment=0), "segment"),
    (lambda: SystemSpec("swa", "x", dtype="float8"), "dtype"),
    (lambda: SystemSpec("swa", "x", {"memory_type": "mamba2"}), "mamba2: kind"),
    (lambda: SystemSpec("mamba2", "x", {"memory_type": "ttt"}), "memory_type=mamba2"),
    (lambda: str(SystemSpec("full", "x", label="a&b")), "'&'"),
    (lambda: parse_spec("swa:x?window=big"), "integer"),
    (lambda: parse_spec("swa:x?skip_memory=maybe"), "0 or 1"),
    (lambda: parse_spec("swa:x?segment=-3"), "positive"),
    (lambda: parse_spec("swa:x?window=1&&sinks=2"), "key=value"),
])
def test_a_spec_that_does_not_fit_its_kind_is_refused_when_built(build, match):
    with pytest.raises(SystemSpecError, match=match):
        build()


def test_the_demo_specs_are_typed_and_named_without_escapes(tiny_adapter):
    from allmem.demo import system_specs

    specs = system_specs(str(tiny_adapter), window=16, sinks=2)
    assert [s.name for s in specs.values()] == ["full attention", "SWA + sinks", "AllMem"]
    assert specs["swa"].config == {"window": 16, "sinks": 2}
    assert all(parse_spec(str(s)) == s for s in specs.values())


def test_full_attention_generation_equals_transformers_generate(tiny_smollm_dir):
    """The full system decodes through continue_text with a DynamicCache, prefilled in segments
    of 16 and the last prompt token given its position: the same tokens as one generate()."""
    base, tok = allmem.load_base(str(tiny_smollm_dir))
    with torch.no_grad():  # sharper than the random init, so the greedy tokens vary
        for p in base.model.layers.parameters():
            p.mul_(8)
    system = FullAttentionSystem("full", base.eval(), tok, segment=16)
    ids = system.encode(" ".join(f"Line {i}: the quick brown fox number {i * 7 % 13} jumps." for i in range(8)))
    assert len(ids) > 3 * 16
    expected = base.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert len(set(expected.tolist())) > 6
    assert system.generate_ids(ids, 12) == tok.decode(expected, skip_special_tokens=True)
