"""Properties that transformers' own GPT-2 / OPT / GPT-Neo model tests check, asserted here on patched
models against the same models unpatched (those tests are not shipped with transformers' wheel and need
the network, so their checks are kept as ours): a patched model's config builds new models of every head
type, incremental decoding with the cache equals one full pass, an all-ones mask equals no mask,
save_pretrained / from_pretrained round trips, resize_token_embeddings, training-mode gradients, and what
`config.output_attentions = True` does."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_patching import FAMILIES, build, tiny_config

import fusedgpt

transformers.logging.set_verbosity_error()

HEADS = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Model, transformers.GPT2ForSequenceClassification,
             transformers.GPT2ForTokenClassification, transformers.GPT2ForQuestionAnswering),
    "opt": (transformers.OPTForCausalLM, transformers.OPTModel, transformers.OPTForSequenceClassification,
            transformers.OPTForQuestionAnswering),
    "gpt_neo": (transformers.GPTNeoForCausalLM, transformers.GPTNeoModel, transformers.GPTNeoForSequenceClassification,
                transformers.GPTNeoForTokenClassification, transformers.GPTNeoForQuestionAnswering),
}


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_config_builds_every_head_type(family):
    """patch() sets attn_implementation="fusedgpt" on the config the model shares with its copies; models
    built from it (GPT-Neo looks its attention class up by that name) must work and match eager."""
    model = build(family)
    eager = copy.deepcopy(model)
    fusedgpt.patch(model)
    ids = torch.randint(1, 100, (2, 11))
    for head in HEADS[family]:
        built = head(model.config).eval()
        assert built(ids[:1]) is not None, head.__name__  # one row: sequence classification needs no pad id
    again = type(model)(copy.deepcopy(model.config)).eval()
    again.load_state_dict(eager.state_dict())
    auto = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    auto.load_state_dict(eager.state_dict())
    with torch.no_grad():
        expected = eager(ids).logits
        for built in (again, auto):
            torch.testing.assert_close(built(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_implementation_fusedgpt_builds_gpt_neo_too(family):
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="fusedgpt")
    assert model.config._attn_implementation == "fusedgpt"
    if family == "gpt_neo":
        assert type(model.transformer.h[1].attn.attention).__name__ == "FusedGPTNeoSelfAttention"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_incremental_decoding_equals_one_pass(family):
    model = fusedgpt.patch(build(family))
    ids = torch.randint(1, 100, (2, 12))
    full = model(ids).logits
    first = model(ids[:, :7], use_cache=True)
    cache = first.past_key_values
    steps = [first.logits]
    for position in range(7, 12):
        out = model(ids[:, position:position + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_all_ones_mask_equals_no_mask(family):
    model = fusedgpt.patch(build(family))
    ids = torch.randint(1, 100, (3, 9))
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_save_pretrained_round_trip_of_a_patched_model(family, tmp_path):
    model = build(family)
    eager = copy.deepcopy(model)
    fusedgpt.patch(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == set(eager.state_dict())
    for name, tensor in eager.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(1, 100, (2, 10))
    torch.testing.assert_close(loaded(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_resize_token_embeddings_on_a_patched_model(family):
    model = fusedgpt.patch(build(family))
    model.resize_token_embeddings(120)
    assert model(torch.randint(1, 120, (1, 6))).logits.shape == (1, 6, 120)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_gradients_match_unpatched(family):
    model = build(family, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if family == "gpt2" else \
        build(family, dropout=0.0, attention_dropout=0.0) if family == "opt" else \
        build(family, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0)
    eager = copy.deepcopy(model).train()
    fusedgpt.patch(model).train()
    ids = torch.randint(1, 100, (2, 10))
    for candidate in (model, eager):
        candidate(ids, labels=ids).loss.backward()
    for (name, parameter), (_, reference) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_output_attentions_by_argument_and_by_config(family):
    """The forward argument works on a patched model (that call runs eager attention, with a warning).
    transformers itself refuses `config.output_attentions = True` for any implementation but "eager" (sdpa
    included), so a patched model refuses it too, with transformers' message; unpatch() first to use it."""
    model = fusedgpt.patch(build(family))
    ids = torch.randint(1, 100, (2, 7))
    out = model(ids, output_attentions=True)  # (warns once per process: tests/test_patching.py checks that)
    assert len(out.attentions) == model.config.num_hidden_layers and out.attentions[0].shape[-2:] == (7, 7)
    with pytest.raises(ValueError, match="output_attentions.*not supported.*fusedgpt.*eager"):
        model.config.output_attentions = True
    fusedgpt.unpatch(model)
    model.config.output_attentions = True
    assert len(model(ids).attentions) == model.config.num_hidden_layers
