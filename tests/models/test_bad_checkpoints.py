"""Bad checkpoints and bad generation settings are clear errors that name the file or the setting: an index
that points outside its directory, truncated weights, malformed JSON, a device that does not exist, token
ids outside the vocabulary, NaN settings, an oversized seed, a mask that is not 0/1, an empty batch; the
CLI turns each into one line and a non-zero exit."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import gpt2_config

import fusedgpt
from fusedgpt.cli import main
from fusedgpt.models.gpt import GPTConfig
from fusedgpt.ops import attention


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(gpt2_config()).save_pretrained(directory)
    return directory


def test_index_pointing_outside_the_directory_is_refused(checkpoint, tmp_path):
    secret = tmp_path / "secret.safetensors"
    (checkpoint / "model.safetensors").rename(secret)
    index = {"weight_map": {"transformer.wte.weight": "../secret.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map entry '\.\./secret\.safetensors' is not a file inside .*refusing"):
        fusedgpt.from_pretrained(checkpoint)
    index["weight_map"]["transformer.wte.weight"] = str(secret)  # an absolute path is outside too
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file inside"):
        fusedgpt.from_pretrained(checkpoint)


def test_truncated_weights_name_the_file(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read \(truncated or corrupt\?\)"):
        fusedgpt.from_pretrained(checkpoint)
    weights.unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin cannot be read"):
        fusedgpt.from_pretrained(checkpoint)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "tokenizer.json",
                                  "tokenizer_config.json"])
def test_malformed_json_names_the_file(checkpoint, name):
    (checkpoint / name).write_text('{"model_type": "gpt2",')
    if name == "model.safetensors.index.json":
        (checkpoint / "model.safetensors").unlink()
    load = fusedgpt.load_tokenizer if name.startswith("tokenizer") else fusedgpt.from_pretrained
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}"):
        load(checkpoint)


def test_json_that_is_not_an_object(checkpoint):
    (checkpoint / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object, got list"):
        fusedgpt.from_pretrained(checkpoint)


@pytest.mark.parametrize("device, message", [
    ("cpu:5", "does not exist: the CPU is device cpu"),
    ("gpu", "is not a device"),
    ("cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}", "cuda"),
])
def test_device_that_does_not_exist(checkpoint, device, message):
    with pytest.raises(ValueError, match=message):
        fusedgpt.from_pretrained(checkpoint, device=device)


@pytest.mark.parametrize("arguments, message", [
    (["--device", "cpu:5"], "--device: device 'cpu:5' does not exist"),
    (["--device", "cpu"], "cannot be read (truncated or corrupt?)"),
])
def test_cli_bad_device_and_corrupt_checkpoint_are_one_line(checkpoint, capsys, arguments, message):
    from fusedgpt.models.tiny import TINY_MODEL_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((TINY_MODEL_DIR / name).read_bytes())
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert main(["generate", "--model", str(checkpoint), "hello", "--temperature", "0"] + arguments) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err


@pytest.mark.parametrize("settings, message", [
    (dict(pad_token_id=10**6), r"pad_token_id must be a token id in \[0, 100\), got 1000000"),
    (dict(pad_token_id=-1), "pad_token_id must be a token id"),
    (dict(eos_token_id=[3, 100]), r"eos_token_id must be a token id in \[0, 100\), got 100"),
    (dict(do_sample=True, temperature=float("nan")), "temperature must be a number > 0"),
    (dict(do_sample=True, top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, seed=2**64), r"seed must be an int in \[0, 2\^64\), got 18446744073709551616"),
    (dict(do_sample=True, seed=-1), "seed must be an int"),
])
def test_generation_settings_are_checked(settings, message):
    model = fusedgpt.from_config(gpt2_config())
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, **settings)


def test_attention_mask_must_be_zeros_and_ones():
    model = fusedgpt.from_config(gpt2_config())
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model.generate(ids, torch.tensor([[0.5, 1.0, 1.0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model.generate(ids, torch.tensor([[2, 1, 1]]), max_new_tokens=2)


def test_empty_batch_and_empty_heads():
    model = fusedgpt.from_config(gpt2_config())
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, S\] with B >= 1 and S >= 1, got \(0, 3\)"):
        model.generate(torch.zeros(0, 3, dtype=torch.int64), max_new_tokens=2)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        GPTConfig(family="gpt2", vocab_size=10, hidden_size=8, num_layers=1, num_heads=0, max_positions=8,
                  ffn_size=32)
    q = torch.randn(1, 4, 2, 0)
    with pytest.raises(ValueError, match="at least one head of at least one channel"):
        attention(q, q, q)
    empty = torch.randn(0, 1, 2, 8)
    assert fusedgpt.ops.decode_attention(empty, torch.randn(0, 4, 2, 8), torch.randn(0, 4, 2, 8),
                                         torch.zeros(0, dtype=torch.int32), backend="torch").shape == (0, 1, 2, 8)
