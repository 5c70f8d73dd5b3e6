"""fusedgpt's GPT-2 / OPT / GPT-Neo models against transformers 5.17 (eager attention): logits of
random-initialised tiny models of every variant within the tolerance rule of a float64 Hugging Face
model, on the reference ops and on the Triton kernels (interpreter on the CPU), with left-padded
batches; GPT-Neo past its window (a small window here, the real 256 window over 300 tokens too);
padding rules; config conversion and its defaults; real sizes on a GPU (marked gpu)."""

import copy
import dataclasses

import pytest
import torch
import transformers
from tiny_models import (CPU_BACKENDS, VARIANTS, assert_logits_match, gpt2_config, gpt_neo_config, hf_model, hf_positions,
                         left_padded, set_backend)

import fusedgpt
from fusedgpt.models import GPTConfig, convert_config, from_config, gpt2, gpt_neo, opt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_with_left_padding(monkeypatch, backend, variant):
    set_backend(monkeypatch, backend, "cpu")
    hf = hf_model(variant)
    ours = fusedgpt.from_hf(hf)
    ids, mask = left_padded([14, 9])  # 14 tokens: past GPT-Neo's test windows (8 and 5)
    assert_logits_match(hf, ours, ids, mask, f"{variant} padded batch")
    assert_logits_match(hf, ours, ids[:1], None, f"{variant} no mask")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["gpt2", "opt-350m", "gpt_neo"])
def test_left_padded_rows_get_their_unpadded_logits(monkeypatch, backend, variant):
    set_backend(monkeypatch, backend, "cpu")
    ours = fusedgpt.from_hf(hf_model(variant))
    ids, mask = left_padded([12, 7, 1])
    batched = ours(ids, mask)
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        alone = ours(ids[row:row + 1, -length:])
        torch.testing.assert_close(batched[row:row + 1, -length:], alone, atol=1e-5, rtol=1e-5)


def test_gpt_neo_real_window_over_300_tokens(monkeypatch):
    """The published 256-token local window, with sequences long enough for it to cut (reference ops)."""
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")
    config = gpt_neo_config(window_size=256, max_position_embeddings=512, hidden_size=32)
    hf = transformers.GPTNeoForCausalLM(config).eval()
    ours = fusedgpt.from_hf(hf)
    assert ours.config.attention_windows == [None, 256]
    ids, mask = left_padded([300, 290])
    assert_logits_match(hf, ours, ids, mask, "gpt-neo window 256")
    # The window matters: the same model without it gives other logits at the last position.
    unwindowed = copy.deepcopy(ours)
    for block in unwindowed.blocks:
        block.window = None
    assert not torch.allclose(unwindowed(ids, mask)[:, -1], ours(ids, mask)[:, -1], atol=1e-4)


def test_right_padding_and_holes_are_errors():
    ours = from_config(gpt2_config())
    ids = torch.randint(0, 100, (2, 6))
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="row 1 is not left-padded"):
        ours(ids, right)
    holes = torch.tensor([[0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="row 0 is not left-padded"):
        ours(ids, holes)
    with pytest.raises(ValueError, match="only 0"):
        ours(ids, torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="shape of input_ids"):
        ours(ids, torch.ones(2, 5, dtype=torch.int64))


def test_bad_input_ids_are_errors():
    ours = from_config(gpt2_config(n_positions=16))
    with pytest.raises(ValueError, match=r"token ids in \[0, 100\)"):
        ours(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match="17 positions but this gpt2 model has 16"):
        ours(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64 or int32"):
        ours(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"shape \[B, S\]"):
        ours(torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("adapter,config_class", [(gpt2, transformers.GPT2Config), (opt, transformers.OPTConfig),
                                                  (gpt_neo, transformers.GPTNeoConfig)])
def test_adapter_defaults_are_transformers_defaults(adapter, config_class):
    """Old config.json files omit settings; the adapters then assume transformers' own defaults (the
    declared default, or the value it resolves to, e.g. GPT-Neo's attention_types None -> 12 pairs)."""
    declared = {field.name: field.default for field in dataclasses.fields(config_class)}
    resolved = config_class().to_dict()
    for name, value in adapter.DEFAULTS.items():
        assert value in (declared[name], resolved[name]), \
            f"{adapter.MODEL_TYPE}: {name} default {value!r}, transformers {declared[name]!r} / {resolved[name]!r}"


def test_config_conversion_of_each_family():
    scaled = convert_config(gpt2_config(n_layer=3, n_embd=48, n_head=3, scale_attn_by_inverse_layer_idx=True))
    assert scaled.attention_scales == pytest.approx([16 ** -0.5, 16 ** -0.5 / 2, 16 ** -0.5 / 3])
    assert scaled.activation == "gelu_tanh" and scaled.ffn_size == 192 and scaled.max_positions == 128
    assert convert_config(gpt2_config(scale_attn_weights=False)).attention_scales == [1.0, 1.0]
    opt_350m = convert_config({"model_type": "opt", "hidden_size": 1024, "num_hidden_layers": 24, "ffn_dim": 4096,
                               "num_attention_heads": 16, "do_layer_norm_before": False, "word_embed_proj_dim": 512})
    assert (opt_350m.pre_layer_norm, opt_350m.final_layer_norm, opt_350m.embed_size) == (False, False, 512)
    assert (opt_350m.position_offset, opt_350m.activation, opt_350m.max_positions) == (2, "relu", 2048)
    neo = convert_config({"model_type": "gpt_neo", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
                          "attention_types": [[["global", "local"], 2]]})
    assert neo.attention_windows == [None, 256, None, 256] and neo.attention_scales == [1.0] * 4
    assert not neo.qkv_bias and neo.out_bias
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        convert_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="activation_function 'swish'"):
        convert_config({"model_type": "gpt2", "activation_function": "swish"})
    with pytest.raises(ValueError, match="attention_layers"):
        convert_config({"model_type": "gpt_neo", "num_layers": 3, "attention_types": [[["global", "local"], 1]]})
    with pytest.raises(ValueError, match="cross-attention"):
        convert_config(gpt2_config(add_cross_attention=True))


def test_from_config_builds_random_models():
    for config in (gpt2_config(), gpt2_config().to_dict(), convert_config(gpt2_config())):
        model = from_config(config, dtype="float16")
        assert model.dtype == torch.float16 and not any(p.requires_grad for p in model.parameters())
    model = from_config(dataclasses.replace(convert_config(gpt2_config()), tie_word_embeddings=False))
    assert model.lm_head is not None
    logits = model(torch.randint(0, 100, (2, 5)))
    assert logits.shape == (2, 5, 100) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="multiple of num_heads"):
        GPTConfig(family="gpt2", vocab_size=10, hidden_size=30, num_layers=1, num_heads=4, ffn_size=8, max_positions=8)


def _column_major(weight):
    return weight.stride() == (1, weight.shape[0])


def test_matrices_are_laid_out_for_their_device_and_dtype():
    """float32 on the CPU: every matrix the model multiplies by (each Linear's weight, the tied lm_head)
    is column-major, whichever way the model was built or moved; other dtypes row-major. Values, shapes,
    the Parameters themselves and the logits do not change."""
    config = dataclasses.replace(convert_config(gpt2_config()), tie_word_embeddings=True)
    model = from_config(config)
    matrices = model.matrices()
    assert len(matrices) == 4 * config.num_layers + 1 and all(_column_major(w) for w in matrices)
    assert any(w is model.embed_tokens.weight for w in matrices)  # tied: the embedding is the lm_head
    ids = torch.randint(0, config.vocab_size, (2, 6))
    logits = model(ids)
    rows = copy.deepcopy(model)
    for weight in rows.matrices():
        weight.data = weight.data.contiguous()  # the same values, row-major
    torch.testing.assert_close(model(ids), rows(ids), rtol=1e-5, atol=1e-5)
    before = [id(w) for w in model.parameters()]
    model.half()
    assert all(w.is_contiguous() for w in model.matrices()) and model.dtype == torch.float16
    model.float()
    assert all(_column_major(w) for w in model.matrices()) and [id(w) for w in model.parameters()] == before
    torch.testing.assert_close(model(ids), logits, rtol=1e-2, atol=1e-2)  # through float16 and back
    loaded = fusedgpt.from_hf(hf_model("gpt2"), dtype=torch.float32)
    assert all(_column_major(w) for w in loaded.matrices())
    assert all(w.is_contiguous() for w in fusedgpt.from_hf(hf_model("gpt2"),
                                                          dtype=torch.bfloat16).matrices())


# ---- real sizes on a GPU -------------------------------------------------------------------------------

REAL_SIZES = {
    "gpt2-124M": lambda: gpt2_config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    "opt-125m": lambda: transformers.OPTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                               ffn_dim=3072, attn_implementation="eager"),
    "opt-350m": lambda: transformers.OPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                               ffn_dim=4096, do_layer_norm_before=False, word_embed_proj_dim=512,
                                               attn_implementation="eager"),
    "gpt-neo-125M": lambda: gpt_neo_config(hidden_size=768, num_layers=12, num_heads=12, window_size=256,
                                           attention_types=[[["global", "local"], 6]], max_position_embeddings=2048,
                                           vocab_size=50257),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(REAL_SIZES))
def test_real_size_logits_on_gpu(name, dtype):
    """Random weights at the published sizes; the baseline is transformers in the same dtype."""
    config = REAL_SIZES[name]()
    hf = transformers.AutoModelForCausalLM.from_config(config).eval().to("cuda", dtype)
    ours = fusedgpt.from_hf(hf)
    ids, mask = left_padded([300, 257], vocab=config.vocab_size)
    assert_logits_match(hf, ours, ids.cuda(), mask.cuda(), f"{name} {dtype}")


# ---- training ------------------------------------------------------------------------------------------

def _training_losses(model, step_loss, steps=3, lr=0.05):
    """The losses of `steps` SGD steps (float32)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = step_loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["gpt2", "opt-350m", "gpt_neo"])
def test_training_with_labels_follows_transformers(monkeypatch, backend, variant):
    """A forward with labels returns the mean next-token loss (through linear_cross_entropy: no logits);
    three optimizer steps of the converted model give transformers' losses, left padding and ignored
    labels included: every op's backward (Triton's kernels under the interpreter, or torch's) is right."""
    set_backend(monkeypatch, backend, "cpu")
    hf = hf_model(variant)  # eval mode, so no dropout: the two runs must see the same function
    ours = fusedgpt.from_hf(hf).requires_grad_(True)
    ids, mask = left_padded([14, 9])
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5] = -100  # a position that does not count
    # A row's first token would be predicted from a pad position, which sees no key here and its own pad
    # embedding in transformers: not a prediction anyone trains on.
    labels[torch.arange(ids.shape[0]), mask.argmax(dim=1)] = -100
    positions = hf_positions(mask)
    theirs = _training_losses(hf, lambda m: m(input_ids=ids, attention_mask=mask, position_ids=positions,
                                              labels=labels).loss)
    mine = _training_losses(ours, lambda m: m(ids, mask, labels=labels))
    assert mine[-1] < mine[0]
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=2e-4, atol=2e-4)
    with torch.no_grad():
        logits = ours(ids, mask)
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1))
        torch.testing.assert_close(ours(ids, mask, labels=labels), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels must be int64 with input_ids' shape"):
        ours(ids, mask, labels=labels[:, 1:])
