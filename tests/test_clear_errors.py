"""Bad adapters, bad settings and a resume that does not fit are one ``error:`` line with the
fix and exit code 2, without a traceback, and (where possible) before any model loads."""

import json

import pytest
import torch

import allmem
from allmem import cli, loading

MAX_TOKENS = 2**22  # the bound allmem.config.MAX_TOKENS puts on window, sinks and chunk
from allmem.modeling import ADAPTER_CONFIG, ADAPTER_WEIGHTS


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a base model fails the test: the error must come first."""
    def refuse(*args, **kwargs):
        pytest.fail("a base model was loaded before the error")

    monkeypatch.setattr(loading, "load_base", refuse)
    monkeypatch.setattr(allmem, "load_base", refuse)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]  # (warnings of libraries aside)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _generate(model, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    return cli.main(["generate", "--model", str(model), "--prompt-file", str(prompt), "--max-new-tokens", "1",
                     "--quiet"])


def _adapter(tmp_path, config_text: str | None, weights: bool = True):
    folder = tmp_path / "adapter"
    folder.mkdir()
    if weights:
        (folder / ADAPTER_WEIGHTS).write_bytes(b"not read before the config")
    if config_text is not None:
        (folder / ADAPTER_CONFIG).write_text(config_text)
    return folder


def _config_json(**allmem_changes) -> str:
    return json.dumps({"format": "allmem-adapter/1", "base": "smollm2", "base_signature": {"layers": 30},
                       "allmem": {"window": 256, "sinks": 4, "chunk": 128, **allmem_changes}})


def test_an_adapter_folder_without_its_config_is_not_taken_for_a_base_model(tmp_path, capsys, no_model_load):
    folder = _adapter(tmp_path, None)
    assert _generate(folder, tmp_path) == 2
    _one_error_line(capsys, str(folder), ADAPTER_CONFIG, "incomplete")
    with pytest.raises(allmem.modeling.AdapterFileError, match="incomplete"):
        allmem.from_pretrained(folder)


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "JSON list, not an object"),
    (json.dumps({"format": "allmem-adapter/1", "base": "smollm2"}), "lacks base_signature, allmem"),
    (json.dumps({"format": "allmem-adapter/1", "base": 3, "base_signature": {}, "allmem": {}}), "lacks base"),
    (json.dumps({"format": "something-else"}), "has format"),
], ids=["bad-json", "a-list", "missing-fields", "wrong-type", "foreign"])
def test_a_broken_adapter_config_is_one_error_line_before_the_model_loads(tmp_path, capsys, no_model_load, text,
                                                                          needle):
    folder = _adapter(tmp_path, text)
    assert _generate(folder, tmp_path) == 2
    _one_error_line(capsys, str(folder / ADAPTER_CONFIG), needle)


@pytest.mark.parametrize("changes,needle", [
    (dict(window=True), "window must be a positive integer"),
    (dict(sinks=False), "sinks must be an integer >= 0"),
    (dict(base_lr="0.1"), "base_lr must be a positive number, got '0.1'"),
    (dict(momentum_init="0.5"), "momentum_init must lie strictly between 0 and 1"),
    (dict(clip="1.0"), "clip must be None or a number > 0"),
    (dict(norm_eps="1e-5"), "norm_eps must be a number > 0"),
    (dict(window=10**12), "window must be a positive integer <= 4194304 (2**22 tokens)"),
    (dict(window=1e12), "window must be a positive integer"),
    (dict(sinks=10**9), "sinks must be an integer >= 0 and <= 4194304"),
    (dict(chunk=2**23), "chunk must be a positive integer <= 4194304"),
    (dict(swa_block=2**30), "swa_block must be None or a positive integer <= 4194304"),
    (dict(memory_head_dim=10**7), "memory_head_dim must be None or a positive integer <= 65536"),
    (dict(expansion=10**6), "expansion must be an integer >= 1 and <= 65536"),
    (dict(conv_kernel=True), "conv_kernel must be an integer >= 0"),
    (dict(conv_init="shift"), "conv_init must be one of"),
], ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_bad_config_values_in_an_adapter_are_one_error_line_before_the_model_loads(tmp_path, capsys, no_model_load,
                                                                                   changes, needle):
    with pytest.raises(allmem.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        allmem.AllMemConfig(**{"window": 256, "sinks": 4, "chunk": 128, **changes})
    folder = _adapter(tmp_path, _config_json(**changes))
    assert _generate(folder, tmp_path) == 2
    _one_error_line(capsys, str(folder / ADAPTER_CONFIG), needle)


def test_absurd_sizes_on_the_command_line_fail_before_the_model_loads(tmp_path, capsys, no_model_load):
    assert cli.main(["convert", "--base", "smollm2", "--window", str(10**12), "--out", str(tmp_path / "x")]) == 2
    _one_error_line(capsys, f"<= {MAX_TOKENS}")
    assert cli.main(["convert", "--base", "smollm2", "--sinks", str(10**9), "--out", str(tmp_path / "x")]) == 2
    _one_error_line(capsys, "sinks must be")


def one_step_distill_args(base, output_dir) -> list[str]:
    """Overrides of a one-step `allmem distill` on a tiny model that saves a checkpoint."""
    return [
        f"base={base}", f"train.output_dir={output_dir}", "train.steps=1", "train.save_every=1",
        "train.eval_every=0", "train.warmup_steps=1", "train.recall_prompts=0",
        "data=[{source: text, count: 2, lengths: [64, 64]}]", "heldout=[]",
        "randomize={}", "allmem.window=32", "allmem.chunk=16",
    ]


def test_resume_with_a_changed_memory_shape_is_one_error_line(tiny_smollm_dir, tmp_path, capsys):
    common = one_step_distill_args(tiny_smollm_dir, tmp_path / "run")
    assert cli.main(["distill", "--recipe", "smollm2-cpu", "--quiet", *common]) == 0
    capsys.readouterr()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001" / "trainable.safetensors"
    saved = checkpoint.read_bytes()
    code = cli.main(["distill", "--recipe", "smollm2-cpu", "--quiet", "--resume", *common, "train.steps=2",
                     "allmem.expansion=2", "allmem.init=attention"])
    assert code == 2
    _one_error_line(capsys, "step-000001", "the memory changed shape", "train.output_dir")
    assert checkpoint.read_bytes() == saved


def test_load_checkpoint_checks_every_shape_before_touching_a_parameter(tmp_path):
    from allmem.distill.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint

    params = {"a": torch.nn.Parameter(torch.ones(2)), "b": torch.nn.Parameter(torch.ones(3))}
    optimizer = torch.optim.AdamW(params.values())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 1, params, optimizer, scheduler, {})
    other = {"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(4))}
    with pytest.raises(CheckpointMismatchError, match=r"b has shape \(3,\) in the checkpoint but \(4,\)"):
        load_checkpoint(path, other, optimizer, scheduler)
    assert torch.equal(other["a"], torch.zeros(2))  # nothing was copied
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \['b'\]"):
        load_checkpoint(path, {"a": other["a"]}, optimizer, scheduler)
