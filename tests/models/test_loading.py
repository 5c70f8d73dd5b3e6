"""Loading fusedgpt models: directories written by transformers' save_pretrained (safetensors, sharded
safetensors) and torch.save'd pytorch_model.bin files (whole and sharded) give the logits of
from_hf(model); old key layouts (GPT-2 without `transformer.`, OPT's `decoder.*`, mask buffers);
untied lm_heads; dtype and device; from_hf copies; missing files are errors that name them; tokenizers
from tokenizer.json and from vocab.json + merges.txt, with OPT's leading </s>."""

import json

import pytest
import torch
import transformers
from tiny_models import VARIANTS, hf_model, left_padded

import fusedgpt


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, mask)


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")  # loading is what is tested here; the ops are elsewhere


@pytest.mark.parametrize("variant", ["gpt2-scaled", "opt-350m", "opt-no-bias", "gpt_neo-local"])
def test_save_pretrained_round_trip(tmp_path, variant):
    hf = hf_model(variant)
    expected = fusedgpt.from_hf(hf)
    ids, mask = left_padded([9, 5])
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "single" / "model.safetensors").is_file()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for directory in ("single", "sharded"):
        loaded = fusedgpt.from_pretrained(tmp_path / directory)
        assert loaded.dtype == torch.float32 and loaded.config == expected.config
        assert torch.equal(_logits(loaded, ids, mask), _logits(expected, ids, mask)), directory


@pytest.mark.parametrize("variant", ["gpt2", "opt"])
def test_pytorch_model_bin_whole_and_sharded(tmp_path, variant):
    hf = hf_model(variant)
    hf.config.save_pretrained(tmp_path)
    state = hf.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    ids, mask = left_padded([7, 3])
    expected = _logits(fusedgpt.from_hf(hf), ids, mask)
    assert torch.equal(_logits(fusedgpt.from_pretrained(tmp_path), ids, mask), expected)
    (tmp_path / "pytorch_model.bin").unlink()
    names = sorted(state)
    halves = {"part-1.bin": names[:len(names) // 2], "part-2.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({key: state[key] for key in keys}, tmp_path / file)
    weight_map = {key: file for file, keys in halves.items() for key in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(_logits(fusedgpt.from_pretrained(tmp_path), ids, mask), expected)


def test_old_key_layouts_load(tmp_path):
    """GPT-2 checkpoints from the Hub have no `transformer.` prefix and carry attn.bias mask buffers;
    facebook/opt checkpoints store OPTModel's `decoder.*` keys."""
    from safetensors.torch import save_file

    for variant, rename in [("gpt2", lambda key: key.removeprefix("transformer.")),
                            ("opt-350m", lambda key: key.removeprefix("model."))]:
        hf = hf_model(variant)
        directory = tmp_path / variant
        hf.config.save_pretrained(directory)
        state = {rename(key): value.contiguous() for key, value in hf.state_dict().items() if key != "lm_head.weight"}
        if variant == "gpt2":
            state["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
        save_file(state, str(directory / "model.safetensors"))
        ids, mask = left_padded([6, 4])
        assert torch.equal(_logits(fusedgpt.from_pretrained(directory), ids, mask),
                           _logits(fusedgpt.from_hf(hf), ids, mask)), variant
        save_file({**state, "score.weight": torch.ones(2, 2)}, str(directory / "model.safetensors"))
        with pytest.warns(UserWarning, match=r"1 tensors unused .*score.weight"):
            fusedgpt.from_pretrained(directory)


def test_untied_lm_head(tmp_path):
    config = VARIANTS["opt"]()
    config.tie_word_embeddings = False
    hf = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_()
    hf.save_pretrained(tmp_path)
    loaded = fusedgpt.from_pretrained(tmp_path)
    assert loaded.lm_head is not None and torch.equal(loaded.lm_head.weight, hf.lm_head.weight)
    ids = torch.randint(0, 100, (1, 5))
    torch.testing.assert_close(_logits(loaded, ids, None), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_dtype_and_device_arguments(tmp_path):
    hf = hf_model("gpt_neo")
    hf.save_pretrained(tmp_path)
    half = fusedgpt.from_pretrained(tmp_path, dtype="float16", device="cpu")
    assert half.dtype == torch.float16 and all(p.dtype == torch.float16 for p in half.parameters())
    assert half.device == torch.device("cpu") and not half.training
    hf.half().save_pretrained(tmp_path / "fp16")
    assert fusedgpt.from_pretrained(tmp_path / "fp16").dtype == torch.float16  # None keeps the checkpoint's
    assert fusedgpt.from_pretrained(tmp_path / "fp16", dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be"):
        fusedgpt.from_pretrained(tmp_path, dtype="int8")


def test_from_hf_copies_the_weights():
    hf = hf_model("opt")
    model = fusedgpt.from_hf(hf)
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in hf.parameters()}
    ids = torch.randint(0, 100, (1, 6))
    before = _logits(model, ids, None)
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight.add_(1.0)
    assert torch.equal(_logits(model, ids, None), before)
    assert fusedgpt.from_hf(hf, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(TypeError, match="transformers model"):
        fusedgpt.from_hf(torch.nn.Linear(2, 2))


def test_missing_files_are_errors_that_name_them(tmp_path):
    hf = hf_model("gpt2")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        fusedgpt.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        fusedgpt.from_pretrained(tmp_path)
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        fusedgpt.from_pretrained(tmp_path)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"checkpoint shard not found: .*{shard.name}"):
        fusedgpt.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        fusedgpt.from_pretrained(tmp_path)


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(ValueError, match="transformer.h.2"):
        fusedgpt.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_inner": 64}))
    with pytest.raises(ValueError, match="shape"):
        fusedgpt.from_pretrained(tmp_path)


# ---- tokenizers ----------------------------------------------------------------------------------------

@pytest.fixture
def bpe_files(tmp_path):
    """vocab.json + merges.txt of a small byte-level BPE with GPT-2's and OPT's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog!"] * 20, trainer)
    tokenizer.model.save(str(tmp_path))
    return tmp_path


TEXTS = ["Hello world", "the lazy fox, quickly!", " leading space and ünïcödé"]


def test_tokenizer_from_vocab_and_merges_matches_transformers(bpe_files):
    (bpe_files / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    ours = fusedgpt.load_tokenizer(bpe_files)
    theirs = transformers.GPT2Tokenizer(vocab=str(bpe_files / "vocab.json"), merges=str(bpe_files / "merges.txt"))
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text).input_ids
        assert ours.decode(ours.encode(text).ids) == text


def test_opt_tokenizer_starts_with_eos_token(bpe_files):
    (bpe_files / "config.json").write_text(json.dumps({"model_type": "opt"}))
    ours = fusedgpt.load_tokenizer(bpe_files)
    theirs = transformers.GPT2Tokenizer(vocab=str(bpe_files / "vocab.json"), merges=str(bpe_files / "merges.txt"),
                                        bos_token="</s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids[0] == 2 and ids == theirs(text).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == text
    # tokenizer_config.json decides when it says so; a saved tokenizer.json keeps its own post-processor.
    (bpe_files / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert fusedgpt.load_tokenizer(bpe_files).encode("Hello").ids[0] != 2
    theirs.save_pretrained(bpe_files / "saved")
    (bpe_files / "saved" / "config.json").write_text(json.dumps({"model_type": "opt"}))
    assert fusedgpt.load_tokenizer(bpe_files / "saved").encode("Hello").ids == theirs("Hello").input_ids


def test_missing_tokenizer_files_are_named(tmp_path, bpe_files):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        fusedgpt.load_tokenizer(tmp_path / "nowhere")
    (bpe_files / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab.json and merges.txt \(missing: merges.txt\)"):
        fusedgpt.load_tokenizer(bpe_files)
