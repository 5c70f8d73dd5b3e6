"""The `fusedgpt` command line. `fusedgpt info`: versions, the GPU, the extension's build and the
backend each op will use on this machine. `fusedgpt generate`: text from a local Hugging Face GPT-2 /
OPT / GPT-Neo checkpoint directory (by default the small GPT-2 shipped inside the package), streamed
as it is produced, with prefill and decode tokens/s."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

import fusedgpt
from fusedgpt.ops._backend import choose_backend, triton_interpreter_enabled

DESCRIPTION = """fusedgpt runs GPT-2, OPT and GPT-Neo models on hand-written CUDA and Triton kernels from PyTorch.
Run `fusedgpt COMMAND --help` for a command's options."""

GENERATE_EPILOG = """examples:
  fusedgpt generate "Once upon a time"
  fusedgpt generate "Once upon a time" --temperature 0 --max-new-tokens 32
  fusedgpt generate --model path/to/gpt2 --prompt "The fastest way to" --seed 0

The text streams to stdout; prefill and decode tokens/s go to stderr. Errors are one line on stderr
(exit status 1)."""

OP_FAMILIES = ("layer_norm", "bias_act", "kv_append", "attention", "decode_attention")


def info_lines() -> list[str]:
    import triton

    lines = [
        f"fusedgpt      {fusedgpt.__version__}",
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})",
        f"triton        {triton.__version__}{' (TRITON_INTERPRET=1: kernels run on the CPU)' if triton_interpreter_enabled() else ''}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"gpu {index}         {props.name}, sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        lines.append("gpu           none visible (CPU tensors use the PyTorch reference"
                     f"{' or the Triton interpreter' if triton_interpreter_enabled() else ''})")
        device = torch.device("cpu")
    if fusedgpt.extension_available():
        lines.append(f"extension     fusedgpt._C built for {', '.join(fusedgpt.extension_cuda_archs())}")
    else:
        lines.append(f"extension     NOT AVAILABLE: {fusedgpt.extension_unavailable_reason()}")
    for family in OP_FAMILIES:
        try:
            backend = choose_backend(family, device)
        except ValueError as error:
            backend = f"error: {error}"
        lines.append(f"{family:<13} {backend} (on {device})")
    return lines


def _add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="write text from a local checkpoint directory (default: the small GPT-2 "
                                                      "shipped inside the package)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=GENERATE_EPILOG,
                                 description="Generates text from a local Hugging Face GPT-2 / OPT / GPT-Neo "
                                             "checkpoint directory\n(config.json, weights, tokenizer files), by "
                                             "default from the small GPT-2 shipped with fusedgpt.\nNothing is "
                                             "downloaded.")
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (nothing is downloaded; default: the embedded model, a 6-layer "
                             "GPT-2 trained on the State of the Union addresses)")
    parser.add_argument("prompt_text", nargs="?", default=None, metavar="PROMPT", help="the prompt text")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="the prompt text (the same as PROMPT)")
    prompts.add_argument("--batch-file", help="a file with one prompt per line, generated as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="how many tokens to generate after the prompt (default 64; prompt + new tokens must "
                             "fit the model's position table)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sample at this temperature (0: greedy; unset with no --top-k/--top-p: the "
                             "checkpoint's generation_config.json if it asks to sample, else greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the top-p nucleus")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: random)")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on the CPU), float16, "
                                                         "bfloat16 or float32")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")


class _TextStream:
    """Streamer for one sequence: decodes everything generated so far and prints the new suffix (a
    multi-byte character split across tokens is held back until complete). For a batch it draws a
    progress bar on stderr instead."""

    def __init__(self, tokenizer, batch: int, total: int, eos: list[int], prompt: str):
        self.tokenizer, self.batch, self.total, self.eos, self.prompt = tokenizer, batch, total, eos, prompt
        self.ids: list[int] = []
        self.printed = ""
        self.count = 0

    def __call__(self, chunk: torch.Tensor) -> None:
        if self.count == 0 and self.batch == 1:  # the prompt appears with the first token, after every check
            print(self.prompt, end="", flush=True)
        self.count += chunk.shape[1]
        if self.batch > 1:
            done = int(30 * self.count / self.total)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {self.count}/{self.total} tokens", end="", file=sys.stderr,
                  flush=True)
            return
        self.ids += chunk[0].tolist()
        self._print(final=False)

    def _print(self, final: bool) -> None:
        text = self.tokenizer.decode(_until_eos(self.ids, self.eos), skip_special_tokens=True)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.printed):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text

    def finish(self) -> None:
        """Prints what was held back (an incomplete character at the very end stays a U+FFFD)."""
        if self.batch == 1:
            if self.count == 0:
                print(self.prompt, end="")
            self._print(final=True)
            print()
        else:
            print(file=sys.stderr)


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in eos:
            return ids[:index]
    return ids


def _sampling_defaults(model_dir: str) -> tuple[float | None, int | None, float | None]:
    """(temperature, top_k, top_p) from the checkpoint's generation_config.json when it sets
    do_sample, with transformers' defaults for what it leaves out (1.0, 50, 1.0); else greedy."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None, None, None
    with open(path, encoding="utf-8") as handle:
        settings = json.load(handle)
    if not settings.get("do_sample"):
        return None, None, None
    top_p = settings.get("top_p", 1.0)
    return float(settings.get("temperature", 1.0)), settings.get("top_k", 50) or None, top_p if top_p < 1.0 else None


def _generate(args) -> int:
    from fusedgpt.generation import GenerationOptions, generate_with_stats
    from fusedgpt.models.loading import resolve_device
    from fusedgpt.models.tiny import TINY_MODEL_DIR

    given = [name for name, value in (("PROMPT", args.prompt_text), ("--prompt", args.prompt),
                                      ("--batch-file", args.batch_file)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of PROMPT, --prompt and --batch-file (got {', '.join(given) or 'none'})")
    args.prompt = args.prompt if args.prompt is not None else args.prompt_text
    if args.model is None:
        args.model = str(TINY_MODEL_DIR)
        if not (TINY_MODEL_DIR / "model.safetensors").is_file():
            raise FileNotFoundError(f"the embedded model is missing from this install ({TINY_MODEL_DIR}); "
                                    "pass --model or rebuild it with scripts/train_tiny.py")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"checkpoint directory not found: {args.model} (fusedgpt loads local directories "
                                "only; download the model first)")
    try:
        device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as error:
        raise ValueError(f"--device: {error}") from None
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else args.dtype
    if args.batch_file is not None:
        with open(args.batch_file, encoding="utf-8") as handle:
            prompts = [line.rstrip("\n") for line in handle if line.strip()]
        if not prompts:
            raise ValueError(f"--batch-file {args.batch_file} holds no prompt")
    else:
        prompts = [args.prompt]
    if args.temperature is not None and not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise ValueError("--temperature 0 is greedy decoding; --top-k / --top-p need a temperature > 0")
    if args.temperature is None and args.top_k is None and args.top_p is None:
        args.temperature, args.top_k, args.top_p = _sampling_defaults(args.model)
    do_sample = bool(args.temperature) or args.top_k is not None or args.top_p is not None
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=do_sample,  # checked before loading
                                temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed, sync_every=4)
    tokenizer = fusedgpt.load_tokenizer(args.model)
    model = fusedgpt.from_pretrained(args.model, dtype=dtype, device=device)
    encoded = [tokenizer.encode(prompt).ids for prompt in prompts]
    if not all(encoded):
        raise ValueError("a prompt encodes to no tokens")
    config = model.config
    eos = [] if config.eos_token_id is None else [config.eos_token_id] if isinstance(config.eos_token_id, int) \
        else list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)  # left padding
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    stream = _TextStream(tokenizer, len(prompts), args.max_new_tokens, eos, prompts[0])
    result = generate_with_stats(model, input_ids, attention_mask, options, streamer=stream)
    stream.finish()
    if len(prompts) > 1:
        for index, (prompt, row) in enumerate(zip(prompts, result.ids.tolist())):
            text = tokenizer.decode(_until_eos(row[width:], eos), skip_special_tokens=True)
            print(f"--- {index}\n{prompt}{text}")
    prefill_rate = result.prompt_tokens / max(result.prefill_seconds, 1e-9)
    decode_rate = result.decode_tokens / max(result.decode_seconds, 1e-9)
    print(f"prefill: {result.prompt_tokens} tokens in {result.prefill_seconds:.3f} s ({prefill_rate:.1f} tokens/s)",
          file=sys.stderr)
    print(f"decode:  {result.decode_tokens} tokens in {result.decode_seconds:.3f} s ({decode_rate:.1f} tokens/s, "
          f"batch {len(prompts)}, {model.dtype}, {device})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedgpt", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fusedgpt {fusedgpt.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("info", help="versions, the GPU, the CUDA extension's build and the backend of each op",
                        description="Prints the python / torch / triton / CUDA versions, the visible GPUs, whether "
                                    "the CUDA extension fusedgpt._C is built and for which architectures, and the "
                                    "backend each op family uses on this machine.")
    _add_generate_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
    elif args.command == "generate":
        try:
            return _generate(args)
        except (ValueError, TypeError, KeyError, OSError, RuntimeError) as error:  # one line, no traceback
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"fusedgpt generate: error: {message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nfusedgpt generate: interrupted", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
