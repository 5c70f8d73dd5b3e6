"""The op contract's limits (fusedgpt.ops._limits) are the one source: the C++ files generated from them
are up to date (and the generator notices when they are not), the built extension reports the head
dims of the contract, the dispatch switches expand the generated list, and neither the Triton modules
nor the callers (patching) define limits of their own."""

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

import fusedgpt
from fusedgpt.ops import _limits

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "csrc"))
import generate_sources  # noqa: E402


def test_generated_sources_are_up_to_date():
    assert generate_sources.out_of_date() == [], "run: python csrc/generate_sources.py"


def test_the_generator_sees_a_changed_list(monkeypatch):
    """A head dim added to the contract needs its instantiations and a new header; one taken out leaves
    its instantiation files stale (they would still compile in)."""
    limits = generate_sources.load_limits()
    monkeypatch.setattr(limits, "CUDA_ATTENTION_HEAD_DIMS", (64, 80, 96, 128, 160))
    assert generate_sources.out_of_date(limits) == ["attention/attention_hdim160_bf16.cu",
                                                    "attention/attention_hdim160_fp16.cu", "op_limits.h"]
    assert "X(64) X(80) X(96) X(128) X(160)" in generate_sources.expected_files(limits)[
        generate_sources.CSRC / "op_limits.h"]
    monkeypatch.setattr(limits, "CUDA_ATTENTION_HEAD_DIMS", (64, 128))
    assert generate_sources.out_of_date(limits) == [
        "attention/attention_hdim80_bf16.cu", "attention/attention_hdim80_fp16.cu",
        "attention/attention_hdim96_bf16.cu", "attention/attention_hdim96_fp16.cu", "op_limits.h"]


def test_generated_header_holds_the_contract():
    header = (ROOT / "csrc" / "op_limits.h").read_text()
    listed = re.search(r"#define FUSEDGPT_ATTENTION_HEAD_DIMS\(X\) (.*)", header).group(1)
    assert tuple(int(dim) for dim in re.findall(r"X\((\d+)\)", listed)) == _limits.CUDA_ATTENTION_HEAD_DIMS
    for name, value in [("kMaxBatchHeads", _limits.MAX_BATCH_HEADS), ("kMaxNewTokens", _limits.MAX_NEW_TOKENS),
                        ("kMaxColumns", _limits.MAX_COLUMNS)]:
        assert f"constexpr int64_t {name} = {value};" in header


def test_the_head_dim_switch_expands_the_list_and_refuses_the_rest():
    """One switch on D (common.h's dispatch_head_dim): the generated list's cases, then TORCH_CHECK."""
    common = (ROOT / "csrc" / "common.h").read_text()
    switch = common[common.index("void dispatch_head_dim("):]
    switch = switch[:switch.index("\n}\n")]
    assert "FUSEDGPT_ATTENTION_HEAD_DIMS(FUSEDGPT_HEAD_DIM_CASE)" in switch
    assert 'default: FUSEDGPT_CHECK(false, op, "no CUDA instantiation for head dim "' in switch


@pytest.mark.parametrize("source", ["attention/attention.cu", "decode_attention/decode_attention.cu"])
def test_attention_dispatch_goes_through_the_one_switch(source):
    """No hand-written head-dim cases (which fell through to 128 before): dispatch_head_dim only."""
    text = (ROOT / "csrc" / source).read_text()
    assert "dispatch_head_dim(op, dim, " in text
    assert not re.search(r"case \d+:", text)


def test_the_extension_reports_the_contract_head_dims():
    if not fusedgpt.extension_available():
        pytest.skip(f"the CUDA extension is not built: {fusedgpt.extension_unavailable_reason()}")
    if not hasattr(torch.ops.fusedgpt, "cuda_head_dims"):
        pytest.fail("the extension predates cuda_head_dims(): rebuild it (pip install --no-build-isolation -e .)")
    assert tuple(torch.ops.fusedgpt.cuda_head_dims()) == _limits.CUDA_ATTENTION_HEAD_DIMS


@pytest.mark.parametrize("module,name", [
    ("fusedgpt.ops.attention", "CUDA_HEAD_DIMS"), ("fusedgpt.ops.attention", "MAX_HEAD_DIM"),
    ("fusedgpt.ops.decode_attention", "MAX_NEW_TOKENS"), ("fusedgpt.ops.layer_norm", "MAX_COLUMNS"),
    ("fusedgpt.ops.bias_act", "ACTIVATIONS"), ("fusedgpt.nn.bias_act", "ACTIVATIONS"),
    ("fusedgpt.patching", "MAX_COLUMNS"), ("fusedgpt.patching.attention", "MAX_NEW_TOKENS"),
])
def test_users_of_a_limit_hold_the_contract_object(module, name):
    contract = {"CUDA_HEAD_DIMS": "CUDA_ATTENTION_HEAD_DIMS", "MAX_HEAD_DIM": "TRITON_ATTENTION_MAX_HEAD_DIM"}
    assert getattr(importlib.import_module(module), name) is getattr(_limits, contract.get(name, name))


@pytest.mark.parametrize("family", ["attention", "decode_attention", "kv_append", "layer_norm", "bias_act"])
def test_triton_modules_define_no_contract_limits(family):
    module = importlib.import_module(f"fusedgpt.triton_kernels.{family}")
    limits = [name for name in dir(_limits) if name.isupper()]
    assert [name for name in limits if hasattr(module, name)] == []


def test_every_contract_activation_has_a_triton_code():
    from fusedgpt.triton_kernels.bias_act import ACTIVATION_CODES

    assert sorted(ACTIVATION_CODES) == sorted(_limits.ACTIVATIONS)
    assert sorted(ACTIVATION_CODES.values()) == list(range(len(_limits.ACTIVATIONS)))
