import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# `make test` runs the suite in pytest-xdist workers that share the cores: each takes its share
# (at most 2 threads, the most the small tensors here use well) instead of oversubscribing them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def tiny_smollm_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (and chat template), saved as a
    local Hugging Face directory: fast end-to-end runs of the real pipelines."""
    import allmem

    _, tokenizer = allmem.load_base("smollm2")
    path = tmp_path_factory.mktemp("tiny-smollm")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_adapter(tiny_smollm_dir, tmp_path_factory):
    """A tiny converted model with a non-zero memory, saved as an adapter on the tiny base
    (the SmolLM2 tokenizer and chat template: sessions need one)."""
    import allmem
    from tiny_models import randomise_memory

    base, _ = allmem.load_base(str(tiny_smollm_dir))
    model = allmem.convert(base, allmem.AllMemConfig(window=16, sinks=2, chunk=8), base_name=str(tiny_smollm_dir))
    randomise_memory(model, scale=0.2)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_recall_adapter(tiny_smollm_dir, tmp_path_factory):
    """As ``tiny_adapter``, with the recall run's memory settings (ours): centred features, a
    skip-free read, keys starting as queries, the output in the attention's output space."""
    import allmem
    from tiny_models import randomise_memory

    base, _ = allmem.load_base(str(tiny_smollm_dir))
    config = allmem.AllMemConfig(window=16, sinks=2, chunk=8, centre=True, read_residual=False, key_init="query",
                                 output_init="attention", momentum_init=0.9)
    model = allmem.convert(base, config, base_name=str(tiny_smollm_dir))
    randomise_memory(model, scale=0.2)
    path = tmp_path_factory.mktemp("recall-adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture
def float64_by_default():
    """float64 as the default dtype for one test (a module-level setting would leak into every
    later test); modules of numerical references use it with ``pytestmark``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
