"""Tests of fusedgpt.patch / unpatch on Hugging Face GPT-2, OPT and GPT-Neo models: logits and greedy
generations of patched models against the same models unpatched (eager attention), on tiny
random-initialised configs on the CPU (the reference ops, and the Triton kernels under the interpreter),
real-size configs on a GPU (marked gpu). Logits follow the tolerance rule of tests/utils.py: the float64
reference is the unpatched model in float64, the baseline the unpatched model in the tested dtype."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers
from utils import assert_within_tolerance, skip_unsupported

import fusedgpt
from fusedgpt import patching

transformers.logging.set_verbosity_error()

VOCAB = 100
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
FAMILIES = ("gpt2", "opt", "gpt_neo")


def tiny_config(family: str, **overrides):
    """hidden 32, 4 heads of 8, 2 layers; GPT-Neo: a global then a local layer with a window of 8, so
    prompts of 9+ tokens reach past it."""
    if family == "gpt2":
        settings = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB)
        return transformers.GPT2Config(**{**settings, **NO_SPECIAL_TOKENS, **overrides})
    if family == "opt":
        settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                        max_position_embeddings=128, vocab_size=VOCAB)
        return transformers.OPTConfig(**{**settings, **NO_SPECIAL_TOKENS, **overrides})
    settings = dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                    window_size=8, max_position_embeddings=128, vocab_size=VOCAB)
    return transformers.GPTNeoConfig(**{**settings, **NO_SPECIAL_TOKENS, **overrides})


CAUSAL_LM = {"gpt2": transformers.GPT2LMHeadModel, "opt": transformers.OPTForCausalLM,
             "gpt_neo": transformers.GPTNeoForCausalLM}


@torch.no_grad()
def randomize(model) -> None:
    """Random values in every parameter (transformers initialises norms to 1/0 and biases to 0, which
    would hide a swapped or dropped tensor): norm weights around 1, everything else around 0."""
    for name, parameter in model.named_parameters():
        norm = "ln" in name or "layer_norm" in name
        if parameter.dim() == 1 and norm and name.endswith("weight"):
            parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
        else:
            parameter.normal_(0.0, 0.1)


def build(family: str, model_class=None, **overrides):
    model = (model_class or CAUSAL_LM[family])(tiny_config(family, **overrides)).eval()
    randomize(model)
    return model


def left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max(lengths)] and their left-padded mask (pads hold id 0)."""
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
        ids[row, :width - length] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """generate's position ids: cumsum(mask) - 1, pads at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def logits(model, ids, mask):
    return model(ids, attention_mask=mask, position_ids=positions(mask)).logits


@torch.no_grad()
def float64_reference(model, ids, mask) -> torch.Tensor:
    """The unpatched model in float64 on each row alone, unpadded: logits of the real tokens, [N, vocab].
    (Alone, because in float64 eager OPT turns fully masked pad rows into NaN that leak through 0 * NaN.)"""
    reference_model = copy.deepcopy(model).double()
    keep = mask.bool()
    return torch.cat([reference_model(ids[row:row + 1, keep[row]]).logits[0] for row in range(ids.shape[0])])


@torch.no_grad()
def assert_patched_logits_match(model, ids, mask, dtype=torch.float32, **patch_flags) -> None:
    """Patches `model` (unpatched on entry, float32) and checks its logits in `dtype` on the real tokens
    by the tolerance rule; the model stays patched, in `dtype`."""
    reference = float64_reference(model, ids, mask)
    model.to(dtype)
    baseline = logits(model, ids, mask)
    fusedgpt.patch(model, **patch_flags)
    actual = logits(model, ids, mask)
    keep = mask.bool()
    assert_within_tolerance(actual[keep], reference, baseline[keep], f"{type(model).__name__} logits")


def greedy(model, ids, mask, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kwargs)


def use_backend(monkeypatch, backend: str) -> None:
    skip_unsupported(backend, "cpu", torch.float32)
    monkeypatch.setenv("FUSEDGPT_BACKEND", backend)


CPU_BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


# ----------------------------------------------------------------------------------------------------
# Logits and generations on the CPU
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_logits_match_reference(family, backend, monkeypatch):
    """A left-padded batch whose longest prompt (12 tokens) reaches past GPT-Neo's window of 8."""
    use_backend(monkeypatch, backend)
    model = build(family)
    ids, mask = left_padded([12, 7])
    assert_patched_logits_match(model, ids, mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_unpatched(family, backend, monkeypatch):
    """generate with transformers' dynamic cache from a left-padded batch: the prompt runs the prefill
    attention, each new token the same kernel with Sq = 1 < Sk (bottom-right aligned)."""
    use_backend(monkeypatch, backend)
    model = build(family)
    ids, mask = left_padded([10, 6])
    new_tokens = 3 if backend == "triton" else 5
    expected = greedy(model, ids, mask, new_tokens)
    fusedgpt.patch(model)
    assert torch.equal(greedy(model, ids, mask, new_tokens), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generation_matches_unpatched(family, monkeypatch):
    """cache_implementation="static": the keys are the whole preallocated cache, so the prompt reads the
    filled length once and each decode step runs decode_attention bounded by it. (Against the unpatched
    model's dynamic cache: transformers' own GPT-Neo misplaces its local window over a static cache.)"""
    use_backend(monkeypatch, "torch")
    model = build(family)
    ids, mask = left_padded([11, 5])
    expected = greedy(model, ids, mask, 5)
    fusedgpt.patch(model)
    assert torch.equal(greedy(model, ids, mask, 5, cache_implementation="static"), expected)


def test_static_cache_generation_triton(monkeypatch):
    """The Triton decode-attention kernel (under the interpreter) over GPT-2's static cache."""
    use_backend(monkeypatch, "triton")
    model = build("gpt2")
    ids, mask = left_padded([7, 4])
    expected = greedy(model, ids, mask, 3)
    fusedgpt.patch(model)
    assert torch.equal(greedy(model, ids, mask, 3, cache_implementation="static"), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_logits(family, dtype, monkeypatch):
    use_backend(monkeypatch, "torch")
    model = build(family)
    ids, mask = left_padded([10, 7])
    assert_patched_logits_match(model, ids, mask, dtype)


@pytest.mark.parametrize("flags", [dict(attention=False), dict(layer_norm=False), dict(mlp=False),
                                   dict(attention=True, layer_norm=False, mlp=False)],
                         ids=["no-attention", "no-layer-norm", "no-mlp", "attention-only"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_flag_alone(family, flags, monkeypatch):
    use_backend(monkeypatch, "torch")
    model = build(family)
    ids, mask = left_padded([9, 6])
    assert_patched_logits_match(model, ids, mask, **flags)


@pytest.mark.parametrize("overrides", [dict(do_layer_norm_before=False, word_embed_proj_dim=16),
                                       dict(enable_bias=False, layer_norm_elementwise_affine=False,
                                            _remove_final_layer_norm=True)],
                         ids=["post-ln-350m", "no-bias-no-affine"])
def test_opt_variants(overrides, monkeypatch):
    """opt-350m's post-LN layers (both residual adds folded into the norms) and an OPT without biases
    or norm affines."""
    use_backend(monkeypatch, "torch")
    model = build("opt", **overrides)
    ids, mask = left_padded([9, 6])
    assert_patched_logits_match(model, ids, mask)


def test_gpt2_scaled_variants(monkeypatch):
    """GPT-2's inverse-layer scaling with its fp32 upcast path, 3 heads of 16, a non-4x MLP."""
    use_backend(monkeypatch, "torch")
    model = build("gpt2", n_embd=48, n_head=3, n_layer=3, n_inner=80, scale_attn_by_inverse_layer_idx=True)
    ids, mask = left_padded([9, 6])
    assert_patched_logits_match(model, ids, mask)
    upcast = build("gpt2", scale_attn_weights=False, reorder_and_upcast_attn=True)
    expected = logits(upcast, ids, mask)
    fusedgpt.patch(upcast)
    torch.testing.assert_close(logits(upcast, ids, mask)[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gpt_neo_real_window_beyond_256_tokens(monkeypatch):
    """GPT-Neo-125M's layer pattern and window (256) over 300 tokens: the window must hold; the same
    weights without it give other logits, so the prompt is long enough for the test to mean something."""
    use_backend(monkeypatch, "torch")
    model = build("gpt_neo", num_layers=2, attention_types=[[["global", "local"], 1]], window_size=256,
                  max_position_embeddings=320)
    ids, mask = left_padded([300, 290])
    unwindowed = build("gpt_neo", num_layers=2, attention_types=[[["global", "global"], 1]],
                       max_position_embeddings=320)
    unwindowed.load_state_dict(model.state_dict())
    keep = mask.bool()
    assert not torch.allclose(logits(unwindowed, ids, mask)[keep], logits(model, ids, mask)[keep], atol=1e-3)
    assert_patched_logits_match(model, ids, mask)
    fusedgpt.unpatch(model)  # decode steps past the window
    expected_tokens = greedy(model, ids, mask, 3)
    fusedgpt.patch(model)
    assert torch.equal(greedy(model, ids, mask, 3), expected_tokens)


# ----------------------------------------------------------------------------------------------------
# What patch changes, and undoing it
# ----------------------------------------------------------------------------------------------------

def _parameters(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_replaced_modules(family):
    model = build(family)
    before = _parameters(model)
    layer_norms = [module for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]
    fusedgpt.patch(model)
    after = _parameters(model)
    assert list(after) == list(before) and all(after[name] is before[name] for name in before)
    assert layer_norms and all(isinstance(module, fusedgpt.nn.LayerNorm) for module in layer_norms)
    assert model.config._attn_implementation == patching.ATTENTION_NAME
    family_info = patching.FAMILIES[family]
    blocks = patching._modules_of(model, family_info, family_info.block)
    assert len(blocks) == model.config.num_hidden_layers
    assert all("forward" in block.__dict__ for block in blocks)
    if family_info.mlp is not None:
        assert all("forward" in mlp.__dict__ for mlp in patching._modules_of(model, family_info, family_info.mlp))
    attentions = patching._modules_of(model, family_info, family_info.self_attention)
    assert len(attentions) == (model.config.num_hidden_layers if family == "gpt_neo" else 0)
    assert all("forward" in module.__dict__ for module in attentions)
    assert patching.is_patched(model)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_fused_ops_run_without_fallback(family, monkeypatch):
    """The logits tests would pass if every call fell back to transformers' code: count the fused ops
    a patched forward and a static-cache generate actually call, and see that nothing warned."""
    use_backend(monkeypatch, "torch")
    monkeypatch.setattr(patching.attention, "_warned", set())
    calls = {"attention": 0, "decode_attention": 0, "bias_act": 0, "layer_norm": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    for module, name in ((patching.attention, "attention"), (patching.attention, "decode_attention"),
                         (patching.layers, "bias_act")):  # where patching looks the ops up
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    import fusedgpt.nn.layer_norm as layer_norm_module
    monkeypatch.setattr(layer_norm_module, "layer_norm", counting("layer_norm", layer_norm_module.layer_norm))
    model = fusedgpt.patch(build(family))
    ids, mask = left_padded([9, 6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits(model, ids, mask)
        layers = model.config.num_hidden_layers
        assert calls == {"attention": layers, "decode_attention": 0, "bias_act": layers,
                         "layer_norm": 2 * layers + 1}
        greedy(model, ids, mask, 3, cache_implementation="static")
    assert calls["decode_attention"] == 3 * layers  # the 9-token prompt (<= 16) and two decode steps
    long_ids, long_mask = left_padded([20, 17])
    greedy(model, long_ids, long_mask, 2, cache_implementation="static")
    assert calls["attention"] == 2 * layers and calls["decode_attention"] == 4 * layers  # a 20-token prompt
    assert not patching.attention._warned


@torch.no_grad()
def test_activation_without_kernel_keeps_the_mlp(monkeypatch):
    use_backend(monkeypatch, "torch")
    model = build("gpt_neo", activation_function="silu")
    ids, mask = left_padded([8, 5])
    expected = logits(model, ids, mask)
    with pytest.warns(UserWarning, match="activation 'silu' has no fused kernel"):
        fusedgpt.patch(model)
    assert not any("forward" in module.__dict__ for module in model.modules() if type(module).__name__ == "GPTNeoMLP")
    torch.testing.assert_close(logits(model, ids, mask)[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_flags_choose_what_is_replaced(family):
    model = build(family)
    fusedgpt.patch(model, attention=False, layer_norm=False, mlp=True)
    assert model.config._attn_implementation == "eager"
    assert not any(isinstance(module, fusedgpt.nn.LayerNorm) for module in model.modules())
    fusedgpt.patch(model, attention=True, layer_norm=True, mlp=False)
    assert model.config._attn_implementation == patching.ATTENTION_NAME
    assert any(isinstance(module, fusedgpt.nn.LayerNorm) for module in model.modules())
    family_info = patching.FAMILIES[family]
    if family_info.mlp is not None:
        assert not any("forward" in mlp.__dict__ for mlp in patching._modules_of(model, family_info, family_info.mlp))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_unpatch_round_trip_is_bit_identical(family, monkeypatch):
    use_backend(monkeypatch, "torch")
    model = build(family)
    ids, mask = left_padded([8, 5])
    classes = {name: type(module) for name, module in model.named_modules()}
    before = _parameters(model)
    expected = logits(model, ids, mask)
    expected_tokens = greedy(model, ids, mask, 3)
    fusedgpt.patch(model)
    logits(model, ids, mask)
    greedy(model, ids, mask, 2, cache_implementation="static")
    assert fusedgpt.unpatch(model) is model
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert not any(key.startswith("_fusedgpt") or key in ("forward", "_old_forward")
                   for module in model.modules() for key in module.__dict__)
    assert model.config._attn_implementation == "eager"
    after = _parameters(model)
    assert list(after) == list(before) and all(after[name] is before[name] for name in before)
    assert torch.equal(logits(model, ids, mask), expected)
    assert torch.equal(greedy(model, ids, mask, 3), expected_tokens)
    assert not patching.is_patched(model)


@torch.no_grad()
def test_patch_twice_is_harmless(monkeypatch):
    use_backend(monkeypatch, "torch")
    model = build("gpt2")
    twin = copy.deepcopy(model)
    ids, mask = left_padded([8, 5])
    expected = logits(model, ids, mask)
    fusedgpt.patch(twin)
    once = logits(twin, ids, mask)
    assert fusedgpt.patch(fusedgpt.patch(model)) is model
    assert torch.equal(logits(model, ids, mask), once)
    fusedgpt.patch(model, mlp=False)  # the new flags win
    assert not any("forward" in module.__dict__
                   for module in patching._modules_of(model, patching.FAMILIES["gpt2"], "GPT2MLP"))
    fusedgpt.patch(model.transformer)  # the inner stack, then the whole model: one unpatch undoes all
    fusedgpt.unpatch(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(logits(model, ids, mask), expected)


@torch.no_grad()
def test_deep_copy_of_a_patched_model_is_independent(monkeypatch):
    use_backend(monkeypatch, "torch")
    model = fusedgpt.patch(build("opt"))
    clone = copy.deepcopy(model)
    fusedgpt.unpatch(clone)
    assert patching.is_patched(model) and not patching.is_patched(clone)
    ids, mask = left_padded([6, 6])
    torch.testing.assert_close(logits(model, ids, mask), logits(clone, ids, mask), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Every head type, per-family entry points, unsupported models
# ----------------------------------------------------------------------------------------------------

HEADS = [pytest.param(family, name, id=name) for family in FAMILIES for name in patching.FAMILIES[family].heads]


@pytest.mark.parametrize("family, head", HEADS)
@torch.no_grad()
def test_every_head_type(family, head, monkeypatch):
    use_backend(monkeypatch, "torch")
    model = build(family, getattr(transformers, head))
    ids = torch.randint(1, VOCAB, (1, 2, 9) if head == "GPT2DoubleHeadsModel" else (1, 9))
    reference_model = copy.deepcopy(model).double()
    references = [v for v in reference_model(ids).values() if torch.is_tensor(v) and v.is_floating_point()]
    baselines = [v for v in model(ids).values() if torch.is_tensor(v) and v.is_floating_point()]
    getattr(fusedgpt, f"patch_{family}")(model)
    outputs = [v for v in model(ids).values() if torch.is_tensor(v) and v.is_floating_point()]
    assert outputs and len(outputs) == len(baselines) == len(references)
    for actual, reference, baseline in zip(outputs, references, baselines):
        assert_within_tolerance(actual, reference, baseline, head)


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(TypeError, match="GPT2LMHeadModel.*OPTForCausalLM.*GPTNeoForCausalLM"):
        fusedgpt.patch(torch.nn.Linear(4, 4))
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    with pytest.raises(TypeError, match=r"BertModel \(model_type 'bert'\).*Supported"):
        fusedgpt.patch(bert)
    gpt2 = build("gpt2")
    with pytest.raises(TypeError, match="patch_opt.*GPT2LMHeadModel.*OPTModel, OPTForCausalLM"):
        fusedgpt.patch_opt(gpt2)
    assert not patching.is_patched(gpt2)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fusedgpt.patch("gpt2")


# ----------------------------------------------------------------------------------------------------
# Fallbacks
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_output_attentions_falls_back_with_one_warning(family, monkeypatch):
    use_backend(monkeypatch, "torch")
    monkeypatch.setattr(patching.attention, "_warned", set())
    model = build(family)
    ids, mask = left_padded([9, 6])
    expected = model(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True)
    fusedgpt.patch(model)
    with pytest.warns(UserWarning, match="output_attentions=True"):
        actual = model(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True)
    assert len(actual.attentions) == len(expected.attentions) == model.config.num_hidden_layers
    for got, want in zip(actual.attentions, expected.attentions):  # (B, H, Sq, Sk): the real queries' rows
        torch.testing.assert_close(got.transpose(1, 2)[mask.bool()], want.transpose(1, 2)[mask.bool()],
                                   rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        model(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
@torch.no_grad()
def test_head_mask_falls_back(family, monkeypatch):
    """transformers 5.x dropped head_mask from these models; one passed anyway reaches GPT-2's and OPT's
    attention as a keyword, which falls back (and eager ignores it, as unpatched transformers does)."""
    use_backend(monkeypatch, "torch")
    monkeypatch.setattr(patching.attention, "_warned", set())
    model = build(family)
    ids = torch.randint(1, VOCAB, (1, 7))
    head_mask = torch.ones(model.config.num_hidden_layers, 4)
    expected = model(ids, head_mask=head_mask).logits
    fusedgpt.patch(model)
    with pytest.warns(UserWarning, match="a head_mask"):
        actual = model(ids, head_mask=head_mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_right_padding_falls_back(family, monkeypatch):
    use_backend(monkeypatch, "torch")
    monkeypatch.setattr(patching.attention, "_warned", set())
    model = build(family)
    ids, mask = torch.randint(1, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    expected = model(ids, attention_mask=mask).logits
    fusedgpt.patch(model)
    with pytest.warns(UserWarning, match="not left padding"):
        actual = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# attn_implementation="fusedgpt", torch.compile
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "opt"])
@torch.no_grad()
def test_attn_implementation_fusedgpt(family, monkeypatch):
    """attn_implementation="fusedgpt" through from_config and set_attn_implementation, with a left-padded
    batch (the mask registration carries the padding to the kernel)."""
    use_backend(monkeypatch, "torch")
    eager = build(family)
    ids, mask = left_padded([9, 5])
    expected = logits(eager, ids, mask)
    config = copy.deepcopy(eager.config)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fusedgpt").eval()
    model.load_state_dict(eager.state_dict())
    assert model.config._attn_implementation == "fusedgpt"
    torch.testing.assert_close(logits(model, ids, mask)[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
    eager.set_attn_implementation("fusedgpt")
    torch.testing.assert_close(logits(eager, ids, mask)[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def run_in_a_fresh_interpreter(script: str) -> None:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_import_registers_without_importing_transformers():
    """A fresh interpreter: `import fusedgpt` leaves transformers.modeling_utils unimported, and importing
    it afterwards registers "fusedgpt" in both interfaces."""
    script = (
        "import sys, fusedgpt\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "assert ALL_ATTENTION_FUNCTIONS['fusedgpt'] is fusedgpt.patching.fusedgpt_attention\n"
        "assert ALL_MASK_ATTENTION_FUNCTIONS['fusedgpt'] is fusedgpt.patching.fusedgpt_mask\n"
    )
    run_in_a_fresh_interpreter(script)


def test_import_registers_gpt_neo_when_its_file_comes_first():
    """A fresh interpreter where GPT-Neo's modeling file is the one that imports transformers.modeling_utils
    (it is not complete when the interfaces are registered): attn_implementation="fusedgpt" still builds a
    GPT-Neo model on the fused attention class."""
    run_in_a_fresh_interpreter(textwrap.dedent("""
        import fusedgpt
        from transformers import GPTNeoConfig, GPTNeoForCausalLM
        config = GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, window_size=8, vocab_size=100,
                              attention_types=[[["global", "local"], 1]], attn_implementation="fusedgpt")
        attention = GPTNeoForCausalLM(config).transformer.h[1].attn.attention
        assert type(attention).__name__ == "FusedGPTNeoSelfAttention", type(attention)
    """))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_torch_compile_fullgraph(family, monkeypatch):
    use_backend(monkeypatch, "torch")
    torch._dynamo.reset()
    model = build(family)
    ids, mask = left_padded([9, 6])
    expected = logits(model, ids, mask)
    compiled = torch.compile(fusedgpt.patch(model), backend="eager", fullgraph=True)
    actual = compiled(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_compiled_static_cache_generation(monkeypatch):
    """transformers' compiled generation (static cache, fullgraph decode step), forced onto the CPU."""
    use_backend(monkeypatch, "torch")
    torch._dynamo.reset()
    model = build("gpt_neo")
    ids, mask = left_padded([10, 6])
    expected = greedy(model, ids, mask, 4)
    config = transformers.CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True
    fusedgpt.patch(model)
    assert torch.equal(greedy(model, ids, mask, 4, cache_implementation="static", compile_config=config), expected)
    assert hasattr(model, "_compiled_call")


# ----------------------------------------------------------------------------------------------------
# Real sizes on a GPU
# ----------------------------------------------------------------------------------------------------

def real_config(family: str):
    """GPT-2 124M, OPT-125m and GPT-Neo-125M (random weights)."""
    if family == "gpt2":
        return transformers.GPT2Config(attn_implementation="eager")
    if family == "opt":
        return transformers.OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                                      word_embed_proj_dim=768, vocab_size=50272, attn_implementation="eager")
    return transformers.GPTNeoConfig(hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257,
                                     attention_types=[[["global", "local"], 6]], window_size=256,
                                     attn_implementation="eager")


GPU_BACKENDS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("triton", "cuda")]


def gpu_model(family: str, backend: str, monkeypatch):
    if backend == "cuda" and not fusedgpt.extension_available():
        pytest.fail(f"the CUDA extension is not available: {fusedgpt.extension_unavailable_reason()}")
    monkeypatch.setenv("FUSEDGPT_BACKEND", backend)
    model = CAUSAL_LM[family](real_config(family)).eval().cuda()
    randomize(model)  # logits spread over a few units, so a wrong token stands out from fp16 noise
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_logits_gpu(family, backend, dtype, monkeypatch):
    """Real-size models, a left-padded batch of prompts up to 300 tokens (past GPT-Neo's 256 window)."""
    model = gpu_model(family, backend, monkeypatch)
    ids, mask = (tensor.cuda() for tensor in left_padded([300, 200]))
    assert_patched_logits_match(model, ids, mask, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_real_size_greedy_generation_gpu(family, backend, cache, monkeypatch):
    """fp16 generate (dynamic cache; static cache, which transformers compiles on a GPU), scored by the
    unpatched model in float32: how far each picked token's logit falls below the best one. Exact token
    equality would trip over near-ties, so the tolerance rule applies to that shortfall instead: at most
    2x the unpatched fp16 model's own (eager, dynamic cache) plus a small slack."""
    model = gpu_model(family, backend, monkeypatch)
    reference = copy.deepcopy(model)  # float32, unpatched
    model.half()
    ids, mask = (tensor.cuda() for tensor in left_padded([40, 25, 33, 12]))
    prompt = ids.shape[1]

    def shortfall(generated: torch.Tensor) -> float:
        full_mask = torch.cat([mask, torch.ones_like(generated[:, prompt:])], dim=1)
        scores = logits(reference, generated, full_mask)[:, prompt - 1:-1].float()  # (B, new, vocab)
        chosen = scores.gather(-1, generated[:, prompt:, None])[..., 0]  # (B, new)
        return (scores.max(-1).values - chosen).max().item()

    baseline = shortfall(greedy(model, ids, mask, 24))
    fusedgpt.patch(model)
    kwargs = {} if cache is None else dict(cache_implementation=cache)
    generated = greedy(model, ids, mask, 24, **kwargs)
    assert generated.shape == (ids.shape[0], prompt + 24)
    assert shortfall(generated) <= 2 * baseline + 5e-2


@pytest.mark.gpu
@torch.no_grad()
def test_torch_compile_inductor_gpu(monkeypatch):
    model = gpu_model("gpt2", "triton", monkeypatch).half()
    ids, mask = (tensor.cuda() for tensor in left_padded([64, 40]))
    expected = logits(fusedgpt.patch(model), ids, mask)
    compiled = torch.compile(model, fullgraph=True)
    actual = compiled(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              "opt": dict(dropout=0.0, attention_dropout=0.0),
              "gpt_neo": dict(resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0)}


def _sgd_losses(model, ids, mask, labels, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses, out


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_trains_like_the_unpatched_one(family, backend, checkpointing, monkeypatch):
    """Three SGD steps in float32, in training mode (dropout 0) with left padding and ignored labels: the
    patched model's losses are the unpatched one's (every fused op's backward, the attention's included,
    and the fused head loss, whose output has no logits); with gradient checkpointing too (the patched
    blocks are recomputed in the backward). unpatch() then gives the original forward back."""
    use_backend(monkeypatch, backend)
    original = build(family, **NO_DROPOUT[family]).train()
    if checkpointing:
        original.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched = fusedgpt.patch(copy.deepcopy(original))
    ids, mask = left_padded([13, 8])
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(2), mask.argmax(dim=1)] = -100  # predicted from a pad position: not trained on
    expected, expected_out = _sgd_losses(original, ids, mask, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the eager attention
        actual, out = _sgd_losses(patched, ids, mask, labels)
    assert expected_out.logits is not None and out.logits is None
    assert actual[-1] < actual[0]
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=2e-4, atol=2e-4)
    with torch.no_grad():  # no gradients: the usual forward, logits and loss
        evaluated = patched(ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
    assert evaluated.logits is not None and evaluated.loss is not None
    fusedgpt.unpatch(patched)
    assert patched(ids, attention_mask=mask, position_ids=positions(mask), labels=labels).logits is not None


def test_fused_loss_divides_by_num_items_in_batch(monkeypatch):
    """Under the Trainer's gradient accumulation transformers divides the summed loss by the batches'
    token count (num_items_in_batch); the fused head loss does the same."""
    use_backend(monkeypatch, "torch")
    original = build("gpt2", **NO_DROPOUT["gpt2"])
    patched = fusedgpt.patch(copy.deepcopy(original))
    ids = torch.randint(1, VOCAB, (2, 9))
    items = torch.tensor(40)
    expected = original(ids, labels=ids, num_items_in_batch=items).loss
    actual = patched(ids, labels=ids, num_items_in_batch=items).loss
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_trains_under_bf16_autocast(family, monkeypatch):
    """Mixed precision: float32 parameters under torch.autocast(bfloat16). The fused ops take what they
    can (same-dtype calls) and the rest runs PyTorch's expression; the loss matches the unpatched model's
    under the same autocast, and every parameter gets a finite gradient."""
    use_backend(monkeypatch, "torch")
    original = build(family, **NO_DROPOUT[family]).train()
    patched = fusedgpt.patch(copy.deepcopy(original))
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = original(ids, labels=ids).loss
        actual = patched(ids, labels=ids).loss
    actual.backward()
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected.float(), rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in patched.parameters())
