"""The core does not depend on the baselines, and every memory type meets the one interface
the layer and the cache use (allmem.memories)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import allmem
from allmem.config import MEMORY_TYPES
from allmem.memories import Memory, RecurrentState, build_memory, memory_state_class, memory_type_of

CORE_WITHOUT_BASELINES = """
import sys
sys.path.insert(0, {tests!r})
import allmem.layer, allmem.cache, allmem.modeling
import torch
from tiny_models import tiny_base

def loaded():
    return sorted(m for m in sys.modules if m.startswith("allmem.baselines"))

assert not loaded(), ("importing the core", loaded())
# a TTT model built, run with a cache and saved: the factory and the cache pick the memory
# and its state without the baselines either
model = allmem.convert(tiny_base("qwen3"), allmem.AllMemConfig(window=8, sinks=2, chunk=4))
cache = model.new_cache()
with torch.no_grad():
    model(torch.arange(10)[None], cache=cache)
cache.save({state!r})
assert allmem.AllMemCache.load({state!r}).memory_type() == "ttt"
assert not loaded(), ("a TTT model, its cache saved and loaded", loaded())
"""


def test_core_imports_and_ttt_models_do_not_load_the_baselines(tmp_path):
    code = CORE_WITHOUT_BASELINES.format(tests=str(Path(__file__).parent), state=str(tmp_path / "state.safetensors"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def config(memory_type: str, **kw) -> allmem.AllMemConfig:
    return allmem.AllMemConfig(window=8, sinks=2, chunk=4, memory_type=memory_type, mamba_heads=2, mamba_state=8, **kw)


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_every_memory_type_meets_the_interface(memory_type):
    cfg = config(memory_type)
    memory = build_memory(64, 2, 16, cfg).double()
    assert isinstance(memory, Memory) and isinstance(memory, torch.nn.Module)
    state = memory.empty_state(3, cfg.chunk, dtype=torch.float64)
    assert isinstance(state, RecurrentState) and isinstance(state, memory_state_class(memory_type))
    assert memory_type_of(state) == memory_type

    # the cache's view: named tensors with the batch first, rebuilt and reordered by name
    tensors = state.tensors()
    assert tensors and all(t.shape[0] == 3 for t in tensors.values())
    rebuilt = type(state).from_tensors(tensors).tensors()
    assert rebuilt.keys() == tensors.keys() and all(torch.equal(rebuilt[k], tensors[k]) for k in tensors)
    picked = state.map(lambda t: t[[2, 0]]).tensors()
    assert all(torch.equal(picked[k], tensors[k][[2, 0]]) for k in tensors)

    # the layer's call: (out, state), the state None unless kept
    x, seq_lens = torch.randn(3, 6, 64, dtype=torch.float64), torch.tensor([6, 3, 0])
    out, new_state = memory(x, seq_lens, None, cfg, True)
    assert out.shape == x.shape and memory_type_of(new_state) == memory_type
    assert memory(x, seq_lens, new_state, cfg, False)[1] is None


def test_ttt_memory_takes_the_attention_sizes_unless_configured():
    default = build_memory(64, 2, 16, config("ttt"))
    assert (type(default).__name__, default.heads, default.head_dim) == ("AllMemMemory", 2, 16)
    sized = build_memory(64, 2, 16, config("ttt", memory_heads=3, memory_head_dim=8))
    assert (sized.heads, sized.head_dim) == (3, 8)
    mamba = build_memory(64, 2, 16, config("mamba2"))
    assert (type(mamba).__name__, mamba.heads, mamba.head_dim, mamba.state_size) == ("Mamba2Memory", 2, 16, 8)


def test_unknown_memory_type_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown memory_type 'lstm'; choose one of \('ttt', 'mamba2'\)"):
        memory_state_class("lstm")
    assert memory_type_of(object()) is None
