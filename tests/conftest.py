import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(2)


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
