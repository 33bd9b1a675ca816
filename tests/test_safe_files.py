"""No pickle is read where a safe format exists: base models from a directory with
safetensors load from them only."""

import torch
from transformers import AutoModelForCausalLM

from allmem import loading


def test_a_local_base_with_safetensors_is_loaded_with_use_safetensors(tiny_smollm_dir, monkeypatch):
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = loading.load_base(str(tiny_smollm_dir))
    assert seen.get("use_safetensors") is True
    assert model.dtype == torch.float32


def test_a_directory_with_only_a_bin_is_not_forced_to_safetensors(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: seen.update(k) or "model")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: "tok")
    assert loading._from_pretrained(tmp_path, torch.float32) == ("model", "tok")
    assert seen["use_safetensors"] is None
