"""The embedded SmolLM2-135M-Instruct, converted for real (loaded once, cached as safetensors)."""

import pytest
import torch

import allmem
from allmem.corpus import long_document

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2_ids():
    _, tokenizer = allmem.load_base("smollm2")
    return tokenizer(long_document()[:20000], return_tensors="pt").input_ids[:, :400]


def test_alpha_zero_huge_window_reproduces_smollm2(smollm2_ids):
    base, _ = allmem.load_base("smollm2")
    with torch.no_grad():
        expected = base(smollm2_ids).logits
        model = allmem.convert(base, allmem.AllMemConfig(window=512, sinks=4, chunk=128))
        got = model(smollm2_ids).logits
    diff = (got - expected).abs().max().item()
    print(f"SmolLM2 alpha=0, W>=L: max |logit diff| = {diff:.2e}")
    assert diff < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_convert_of_smollm2_keeps_eta_at_base_lr_and_beta_at_momentum_init():
    """Regression on the real model: Llama's _init_weights ran over the new memory in post_init."""
    base, _ = allmem.load_base("smollm2")
    model = allmem.convert(base, allmem.AllMemConfig())
    x = torch.randn(2, 5, model.config.hidden_size)
    for layer in model.model.layers:
        memory = layer.self_attn.memory
        eta = torch.nn.functional.softplus(memory.eta_proj(x))
        beta = torch.sigmoid(memory.beta_proj(x))
        torch.testing.assert_close(eta, torch.full_like(eta, 0.1))
        torch.testing.assert_close(beta, torch.full_like(beta, 0.5))


def test_adapter_round_trip_and_decode_on_smollm2(tmp_path, smollm2_ids):
    base, _ = allmem.load_base("smollm2")
    model = allmem.convert(base, allmem.AllMemConfig(window=64, sinks=4, chunk=32))
    with torch.no_grad():
        for layer in model.model.layers:  # a non-zero memory contribution
            layer.self_attn.alpha.fill_(0.5)
        x = smollm2_ids[:, :150]
        expected = model(x, use_cache=False).logits
        cache = model.new_cache()
        model(x[:, :100], cache=cache)
        steps = torch.cat([model(x[:, t : t + 1], cache=cache).logits for t in range(100, 150)], 1)
    torch.testing.assert_close(steps, expected[:, 100:], rtol=1e-3, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    rebuilt = allmem.from_pretrained(tmp_path / "adapter")
    assert rebuilt.base_name == "smollm2" and rebuilt.tokenizer is not None
    with torch.no_grad():
        assert torch.equal(rebuilt(x, use_cache=False).logits, expected)


def test_the_recall_adapter_carries_a_passkey_far_past_its_window():
    """smollm2-allmem-recall: on held-out passkey prompts of 768 tokens with the key 400-700 tokens
    back (window 64), the memory prefers the right 5-digit code over a wrong one by many nats
    (+36.1 for the v19 memory shipped in session 17, +34.5 for v16); SWA + sinks (the same model, memory off)
    cannot see the key and has no preference (-0.85)."""
    import random

    from allmem.distill.tasks import make_example
    from allmem.eval.recall import allmem_logits_fn, logits_logprob_fn, margin_items, recall_margins, swa_logits_fn

    model = allmem.from_pretrained("smollm2-allmem-recall")
    assert model.allmem_config.window == 64
    rng = random.Random("recall-adapter-test")
    examples = [make_example("passkey", model.tokenizer, 768, rng, depth=depth, split="heldout") for depth in (0.1, 0.3)]
    items = margin_items(model.tokenizer, examples)
    allmem_margin = recall_margins(logits_logprob_fn(allmem_logits_fn(model)), items).mean
    swa_margin = recall_margins(logits_logprob_fn(swa_logits_fn(model)), items).mean
    print(f"recall margin: AllMem {allmem_margin:+.2f} nats, SWA + sinks {swa_margin:+.2f}")
    assert abs(swa_margin) < 3 and allmem_margin > 20


def test_the_shipped_adapter_loads_matches_its_checksum_and_helps_on_heldout_text():
    """smollm2-allmem: the bf16 adapter in the package (<= 40 MB, SHA-256 as on its card),
    loadable by name, and better than SWA + sinks beyond the window on text it never saw."""
    import hashlib
    import math

    from allmem.eval.ppl import load_text
    from allmem.modeling import SHIPPED_ADAPTERS

    folder = SHIPPED_ADAPTERS["smollm2-allmem"]
    weights = folder / "adapter.safetensors"
    assert weights.stat().st_size <= 40e6
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (folder / "SHA256SUMS").read_text().split()[0] == digest
    assert digest in (folder / "README.md").read_text()
    assert (folder / "recipe.yaml").is_file()

    model = allmem.from_pretrained("smollm2-allmem")
    assert model.allmem_config.window == 256 and model.allmem_config.sinks == 4
    ids = model.tokenizer(load_text("heldout"), return_tensors="pt").input_ids[:, 4096 : 4096 + 1024]
    with torch.no_grad():
        allmem_nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
        with model.memory_disabled():
            swa_nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    beyond = slice(511, None)  # positions 512..1023, outside the 256-token window
    allmem_ppl, swa_ppl = math.exp(allmem_nll[beyond].mean()), math.exp(swa_nll[beyond].mean())
    print(f"held-out positions 512-1023: AllMem {allmem_ppl:.3f}, SWA + sinks {swa_ppl:.3f}")
    assert allmem_ppl < swa_ppl
