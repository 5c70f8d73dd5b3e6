"""fusedgpt.generation: greedy generation token-identical to transformers' generate (float32, CPU,
32 new tokens on the reference ops, fewer on the Triton interpreter) with left-padded batches; EOS per
sequence as Hugging Face stops; the sampling filters against Hugging Face's warpers; seeds; top-k /
top-p restrict the draws; streaming; the static cache reused across calls, and replaced when the
backend or the weights change; settings as GenerationOptions and keywords; the position limit and bad
arguments; models never import generation; `fusedgpt generate` on a tiny checkpoint; CUDA-graph replay
against eager steps (gpu)."""


import pytest
import torch
import transformers
from tiny_models import gpt2_config, hf_model, left_padded, set_backend
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import fusedgpt
from fusedgpt.cli import main
from fusedgpt.generation import (DecodeState, GenerationOptions, capture_blocker, decode_step_backends, filter_logits,
                                 generate, generate_with_stats, use_cuda_graph)
from fusedgpt.models import from_config
from fusedgpt.models.tiny import train_tokenizer

FAMILIES = ["gpt2-scaled", "opt-350m", "opt", "gpt_neo"]


def _hf_greedy(hf, ids, mask, new_tokens, **kwargs):
    return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kwargs)


@pytest.mark.parametrize("variant", FAMILIES)
def test_greedy_matches_transformers_generate(monkeypatch, variant):
    set_backend(monkeypatch, "torch", "cpu")
    hf = hf_model(variant)
    ours = fusedgpt.from_hf(hf)
    ids, mask = left_padded([11, 6, 9])  # GPT-Neo: 11 + 32 tokens run far past its window of 8
    expected = _hf_greedy(hf, ids, mask, 32)
    actual = ours.generate(ids, mask, max_new_tokens=32)
    assert actual.shape == expected.shape == (3, 11 + 32)
    assert torch.equal(actual, expected), f"first difference at {(actual != expected).nonzero()[:1].tolist()}"


@pytest.mark.parametrize("variant", ["gpt2-scaled", "opt-350m", "gpt_neo"])
def test_greedy_matches_transformers_generate_on_triton(monkeypatch, variant):
    """The Triton kernels (interpreted on the CPU: slow, so 8 new tokens) through the same loop."""
    set_backend(monkeypatch, "triton", "cpu")
    hf = hf_model(variant)
    ours = fusedgpt.from_hf(hf)
    ids, mask = left_padded([7, 4])
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=8), _hf_greedy(hf, ids, mask, 8))


def test_eos_stops_each_sequence_as_transformers_does(monkeypatch):
    set_backend(monkeypatch, "torch", "cpu")
    hf = hf_model("gpt2")
    ours = fusedgpt.from_hf(hf)
    ids, mask = left_padded([8, 5])
    free_run = _hf_greedy(hf, ids, mask, 16)
    eos = int(free_run[0, 8 + 3])  # row 0 meets it at its 4th new token at the latest
    expected = _hf_greedy(hf, ids, mask, 16, eos_token_id=eos, pad_token_id=7)
    actual = ours.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=7, sync_every=3)
    assert torch.equal(actual, expected)
    # Both rows ending early trims the output as Hugging Face does; the config's EOS is the default.
    ours.config.eos_token_id = int(free_run[0, 8])
    both = ours.generate(ids[:1], mask[:1], max_new_tokens=16, pad_token_id=7)
    assert both.shape == (1, 9) and int(both[0, -1]) == ours.config.eos_token_id


def test_sampling_filters_match_transformers_warpers():
    logits = torch.randn(4, 100) * 3
    for temperature, top_k, top_p in [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.9, 20, 0.5),
                                      (1.0, 1, None), (1.0, None, 1e-6)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k is not None:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p is not None:
            expected = TopPLogitsWarper(top_p)(None, expected)
        actual = filter_logits(logits, temperature, top_k, top_p)
        assert torch.equal(actual.isinf(), expected.isinf()), (temperature, top_k, top_p)
        torch.testing.assert_close(actual[~actual.isinf()], expected[~expected.isinf()])


def test_sampling_is_reproducible_and_respects_top_k_and_top_p(monkeypatch):
    set_backend(monkeypatch, "torch", "cpu")
    model = fusedgpt.from_hf(hf_model("opt"))
    ids, mask = left_padded([6, 3])
    options = dict(max_new_tokens=24, do_sample=True, temperature=2.0)
    first = model.generate(ids, mask, seed=1, **options)
    assert torch.equal(first, model.generate(ids, mask, seed=1, **options))
    assert not torch.equal(first, model.generate(ids, mask, seed=2, **options))
    greedy = model.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12, do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=12, do_sample=True, top_p=1e-6, seed=3), greedy)
    # Every drawn token lies in the top 3 of the logits that produced it (recomputed by a full forward).
    drawn = model.generate(ids, mask, max_new_tokens=16, do_sample=True, temperature=5.0, top_k=3, seed=4)
    full_mask = torch.cat([mask, torch.ones(2, 16, dtype=mask.dtype)], dim=1)
    logits = model(drawn, full_mask)[:, 5:-1]  # the logits that chose tokens 6 .. 6 + 15
    rank = (logits > logits.gather(-1, drawn[:, 6:, None])).sum(-1)
    assert int(rank.max()) < 3


def test_streamer_receives_every_token_in_order(monkeypatch):
    set_backend(monkeypatch, "torch", "cpu")
    model = fusedgpt.from_hf(hf_model("gpt_neo"))
    ids, mask = left_padded([5, 8])
    chunks = []
    result = generate_with_stats(model, ids, mask, max_new_tokens=10, streamer=chunks.append, sync_every=4)
    assert [chunk.shape[1] for chunk in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat(chunks, dim=1), result.ids[:, 8:])
    assert result.prompt_tokens == 13 and result.decode_tokens == 2 * 9
    assert result.prefill_seconds > 0 and result.decode_seconds > 0


def test_static_cache_is_reused_and_replaced(monkeypatch):
    set_backend(monkeypatch, "torch", "cpu")
    model = fusedgpt.from_hf(hf_model("gpt2"))
    ids, mask = left_padded([9, 4])
    first = model.generate(ids, mask, max_new_tokens=6)
    state = model._decode_state
    assert torch.equal(model.generate(ids, mask, max_new_tokens=6), first) and model._decode_state is state
    model.generate(ids[:1], mask[:1], max_new_tokens=6)  # another batch size: a new cache
    assert model._decode_state is not state
    assert torch.equal(model.generate(ids, mask, max_new_tokens=6), first)


def test_a_backend_change_gets_a_new_state(monkeypatch):
    """FUSEDGPT_BACKEND changing between calls changes the key (the backend each op of the step gets): the
    second call does not reuse the state, nor would it replay a graph, captured on the first backend."""
    hf = hf_model("gpt2")
    model = fusedgpt.from_hf(hf)
    ids, mask = left_padded([5, 3])
    expected = _hf_greedy(hf, ids, mask, 3)
    set_backend(monkeypatch, "torch", "cpu")
    assert torch.equal(model.generate(ids, mask, max_new_tokens=3), expected)
    on_torch = model._decode_state
    # 2 layers: decode_attention each, then every LayerNorm (2 per block + ln_final) and LinearAct (1 per block)
    assert on_torch.key.backends == ("torch",) * (2 + 5 + 2)
    set_backend(monkeypatch, "triton", "cpu")  # the Triton kernels, interpreted (conftest)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=3), expected)
    on_triton = model._decode_state
    assert on_triton is not on_torch and on_triton.key.backends == ("triton",) * 9
    assert on_triton.key[:4] == on_torch.key[:4]  # only the backends differ
    assert torch.equal(model.generate(ids, mask, max_new_tokens=3), expected) and model._decode_state is on_triton


def test_moved_weights_get_a_new_state(monkeypatch):
    """A captured graph reads the parameters by address: new parameter storage (here a round trip
    through float64) is a new key, and the results follow the new parameters."""
    set_backend(monkeypatch, "torch", "cpu")
    model = fusedgpt.from_hf(hf_model("opt"))
    ids, mask = left_padded([6, 4])
    first = model.generate(ids, mask, max_new_tokens=5)
    state = model._decode_state
    model.double().float()
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5), first)
    assert model._decode_state is not state and model._decode_state.key.weights != state.key.weights
    state = model._decode_state
    with torch.no_grad():
        model.embed_tokens.weight.mul_(-1.0)  # in place: the same addresses, so the same state
    assert not torch.equal(model.generate(ids, mask, max_new_tokens=5), first) and model._decode_state is state


def test_settings_as_options_keywords_or_both(monkeypatch):
    set_backend(monkeypatch, "torch", "cpu")
    model = fusedgpt.from_hf(hf_model("gpt_neo"))
    ids, mask = left_padded([4, 7])
    options = GenerationOptions(max_new_tokens=6, do_sample=True, temperature=1.5, seed=5)
    sampled = model.generate(ids, mask, options)
    assert sampled.shape == (2, 7 + 6)
    assert torch.equal(sampled, model.generate(ids, mask, max_new_tokens=6, do_sample=True, temperature=1.5, seed=5))
    assert torch.equal(model.generate(ids, mask, options, max_new_tokens=3), sampled[:, :7 + 3])  # keywords win
    result = generate_with_stats(model, ids, mask, options, do_sample=False)
    assert torch.equal(result.ids, model.generate(ids, mask, max_new_tokens=6)) and result.decode_tokens == 2 * 5
    with pytest.raises(TypeError, match="max_tokens"):
        model.generate(ids, mask, max_tokens=4)
    with pytest.raises(TypeError, match="options must be a fusedgpt.generation.GenerationOptions or None, got int"):
        model.generate(ids, mask, 4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        GenerationOptions(max_new_tokens=0)  # checked when made, before any model runs
    with pytest.raises(ValueError, match="top_k must be a positive int or None"):
        model.generate(ids, mask, options, top_k=0)


def test_generate_is_generations_own_function():
    """GPT.generate is attached by fusedgpt.generation (models never import it: tests/test_layers.py)."""
    assert fusedgpt.models.GPT.generate is generate


def test_position_limit_and_bad_arguments_are_errors(monkeypatch):
    set_backend(monkeypatch, "torch", "cpu")
    model = from_config(gpt2_config(n_positions=32))
    ids = torch.randint(0, 100, (1, 20))
    generate(model, ids, max_new_tokens=12)  # exactly 32 positions: fine
    with pytest.raises(ValueError, match=r"\(20 tokens\) \+ max_new_tokens \(13\) has 33 positions .* has 32"):
        generate(model, ids, max_new_tokens=13)
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        generate(model, torch.zeros(2, 3, dtype=torch.int64), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="not left-padded"):
        generate(model, torch.zeros(1, 3, dtype=torch.int64), torch.tensor([[1, 1, 0]]))
    for kwargs, message in [(dict(max_new_tokens=0), "max_new_tokens"),
                            (dict(do_sample=True, temperature=0.0), "temperature"),
                            (dict(do_sample=True, top_k=0), "top_k"), (dict(do_sample=True, top_p=1.5), "top_p"),
                            (dict(sync_every=0), "sync_every"), (dict(cuda_graph=True), "cuda_graph=True")]:
        with pytest.raises(ValueError, match=message):
            generate(model, ids[:, :4], **{"max_new_tokens": 4, **kwargs})


# ---- whether the decode step is captured ----------------------------------------------------------------

def test_capture_follows_decode_attentions_decision(monkeypatch):
    """generate's CUDA-graph setting asks decode_attention's decision for each layer's call of the step
    (the decision runs here on the CPU; the capture itself needs a GPU): a step the op would send to the
    reference, which reads cache_lens on the host (.tolist()), is not captured, and cuda_graph=True for
    it is an error naming why; the kernels and the torch path read nothing on the host."""
    set_backend(monkeypatch, "triton", "cpu")  # a kernel backend asked for by name
    model = from_config(gpt2_config())
    state = DecodeState(model, 2, 128)
    gpu = torch.device("cuda", 0)
    model.requires_grad_(True)  # parameters being trained, grad mode on: the step's q needs autograd,
    with torch.enable_grad():  # which only the reference serves
        choices = decode_step_backends(model, state)
    model.requires_grad_(False)
    assert [choice.backend for choice in choices] == ["reference", "reference"]
    blocker = capture_blocker(choices)
    assert blocker == ("layer 0's decode_attention call (the 'reference' path) cannot be captured: it needs "
                       "autograd: decode_attention_reference reads cache_lens on the host")
    assert use_cuda_graph(None, gpu, blocker) is False
    with pytest.raises(ValueError, match=r"cuda_graph=True: layer 0's decode_attention call \(the 'reference' path\)"):
        use_cuda_graph(True, gpu, blocker)
    with torch.inference_mode():  # as generate runs it: the Triton kernel, which reads nothing on the host
        choices = decode_step_backends(model, state)
    assert [choice.backend for choice in choices] == ["triton", "triton"]
    # ... but here the lengths live on the CPU, and are checked there: on a GPU they live on the device
    assert {choice.host_read for choice in choices} == {"cache_lens (on the CPU) are checked on the host"}
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")  # so does the torch path (no kernel serves float64 either)
    with torch.inference_mode():
        choices = decode_step_backends(model.double(), DecodeState(model, 2, 128))
    assert [choice.backend for choice in choices] == ["torch", "torch"]
    assert {choice.host_read for choice in choices} == {"cache_lens (on the CPU) are checked on the host"}
    assert use_cuda_graph(None, gpu, None) is True and use_cuda_graph(False, gpu, None) is False
    assert use_cuda_graph(None, torch.device("cpu"), None) is False


# ---- `fusedgpt generate` -------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    """A tiny GPT-2 checkpoint directory with a byte-level BPE tokenizer trained on the spot."""
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = gpt2_config(vocab_size=tokenizer.get_vocab_size(), eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    return tmp_path


def test_cli_generate_streams_text_and_reports_tokens_per_second(monkeypatch, capsys, checkpoint):
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")
    capsys.readouterr()
    assert main(["generate", "--model", str(checkpoint), "--prompt", "the quick", "--max-new-tokens", "6",
                 "--device", "cpu", "--seed", "0", "--temperature", "0.8", "--top-k", "20"]) == 0
    out, err = capsys.readouterr()
    tokenizer = fusedgpt.load_tokenizer(checkpoint)
    prompt = torch.tensor([tokenizer.encode("the quick").ids])
    ids = fusedgpt.from_pretrained(checkpoint).generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.8,
                                                        top_k=20, seed=0)
    new = ids[0, prompt.shape[1]:].tolist()
    new = new[:new.index(0)] if 0 in new else new  # the checkpoint's EOS is 0
    assert out == "the quick" + tokenizer.decode(new) + "\n"
    assert "prefill: 2 tokens" in err and "decode:" in err and "tokens/s" in err


def test_cli_generate_batch_file(monkeypatch, capsys, checkpoint, tmp_path):
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")
    capsys.readouterr()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the lazy dog\nfox\n")
    assert main(["generate", "--model", str(checkpoint), "--batch-file", str(prompts), "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "--- 0\nthe lazy dog" in out and "--- 1\nfox" in out and "batch 2" in err


@pytest.mark.parametrize("arguments,message", [
    (["--model", "/nonexistent/model", "--prompt", "x"], "checkpoint directory not found: /nonexistent/model"),
    (["--prompt", "x", "--dtype", "int8"], "dtype must be"),
    (["--prompt", "x", "--temperature", "0", "--top-k", "3"], "greedy"),
    (["--prompt", "x", "--max-new-tokens", "500"], "positions"),
    (["x", "--prompt", "y"], "exactly one of PROMPT, --prompt and --batch-file (got PROMPT, --prompt)"),
    ([], "exactly one of PROMPT, --prompt and --batch-file (got none)"),
])
def test_cli_generate_errors_are_one_line(monkeypatch, capsys, checkpoint, arguments, message):
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")
    capsys.readouterr()  # drop what writing the checkpoint printed
    if "--model" not in arguments:
        arguments = ["--model", str(checkpoint)] + arguments
    assert main(["generate", "--device", "cpu"] + arguments) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedgpt generate: error:") and message in err and "\n" not in err.split("error:", 1)[1]


# ---- GPU -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("variant", FAMILIES)
def test_cuda_graph_replay_matches_eager_steps(variant):
    model = fusedgpt.from_hf(hf_model(variant).cuda())
    ids, mask = left_padded([11, 6, 9])
    ids, mask = ids.cuda(), mask.cuda()
    eager = model.generate(ids, mask, max_new_tokens=40, cuda_graph=False)
    graphed = model.generate(ids, mask, max_new_tokens=40, cuda_graph=True)
    assert model._decode_state.graph is not None
    assert torch.equal(graphed, eager)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=40), eager)  # replayed graph, new prompt state


@pytest.mark.gpu
@pytest.mark.parametrize("variant", FAMILIES)
def test_fp16_greedy_top1_agreement_with_transformers(variant):
    """Reports the share of positions where fp16 fusedgpt and fp16 transformers pick the same token for
    the same prefix (teacher forcing on transformers' own greedy output); the bar is loose (0.9)."""
    hf = hf_model(variant).cuda().half()
    model = fusedgpt.from_hf(hf)
    ids, mask = left_padded([11, 6, 9])
    ids, mask = ids.cuda(), mask.cuda()
    expected = _hf_greedy(hf, ids, mask, 32)
    full_mask = torch.cat([mask, torch.ones(3, 32, dtype=mask.dtype, device="cuda")], dim=1)
    ours = model(expected, full_mask)[:, 10:-1].argmax(-1)
    agreement = (ours == expected[:, 11:]).float().mean().item()
    print(f"{variant}: fp16 top-1 agreement with transformers {agreement:.3f}")
    assert agreement >= 0.9
