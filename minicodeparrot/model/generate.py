"""Text generation with a KV cache: greedy, temperature, top-k and nucleus (top-p) sampling, stop strings.

The loop is the textbook one: run the prompt once, then feed one token per step while the cache keeps
the keys and values of everything seen. Rows that finish (end-of-text token or a stop string in their
decoded continuation) leave the batch, so the remaining ones run cheaper, and the loop ends when no row
is left. Several prompts run as one batch only when they have the same number of tokens: that keeps
every row's positions and attention mask trivially right (no left padding).
"""

from __future__ import annotations

import argparse
import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from minicodeparrot.errors import UserError
from minicodeparrot.model.gpt import KVCache

# CodeParrot's stop strings: a new top-level statement means the function being completed has ended.
# The book's `first_block` cuts at them, and so does the HumanEval harness (evaluation/humaneval.py imports
# them: defining them there would make the model stage import the evaluation stage).
STOP_STRINGS = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif"]


def first_block(text: str) -> str:
    """The completion up to the first stop string: the body of the function the prompt started."""
    return re.split("|".join(re.escape(s) for s in STOP_STRINGS), text)[0].rstrip()


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept too); k <= 0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p (nucleus sampling).

    A token is dropped when the tokens ranked above it already reach p; the most likely token always stays.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _next_tokens(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def inference_precision(device: torch.device | str, fp32: bool = False) -> AbstractContextManager:
    """The precision `generate`, `evaluate-loss` and `humaneval` run a model in: on a GPU, bf16 autocast
    with TF32 for the matmuls autocast leaves in fp32 (training ran that way, and both are several times
    faster than fp32 on tensor cores); on a CPU, or with `fp32`, plain fp32 (CPU bf16 matmuls are slower
    without AMX, and exact fp32 is what the parity checks compare). Use it as `with inference_precision(d):`.
    """
    if torch.device(device).type != "cuda":
        return nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = not fp32
    torch.backends.cudnn.allow_tf32 = not fp32
    return nullcontext() if fp32 else torch.autocast("cuda", dtype=torch.bfloat16)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on the device without waiting: a plain copy from pageable memory makes the host
    wait for the GPU's queue; from pinned memory it is queued like a kernel."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def _check_request(model, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool, temperature: float,
                   stop_strings: list[str] | None, tokenizer) -> None:
    """One line for each request that cannot be generated."""
    if input_ids.numel() == 0:
        raise UserError("the prompt is empty; generation needs at least one token to condition on")
    if do_sample and temperature <= 0:
        raise UserError(f"temperature must be > 0 when sampling (got {temperature}); use greedy decoding")
    if stop_strings and tokenizer is None:
        raise UserError("stop_strings need the tokenizer to decode the continuation; pass tokenizer=")
    n_positions = model.config.n_positions
    if input_ids.size(1) + max_new_tokens > n_positions:
        raise UserError(
            f"prompt of {input_ids.size(1)} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"n_positions={n_positions}; lower max_new_tokens or shorten the prompt"
        )


def _append_tokens(out: list[list[int]], rows: list[int], new: list[int], eos_token_id: int | None,
                   stop_strings: list[str] | None, tokenizer, tail: int) -> list[bool]:
    """Append each active row's new token; return which rows are finished (end-of-text, or a stop string
    completed within the last `tail` tokens)."""
    finished = []
    for row, tok in zip(rows, new, strict=True):
        out[row].append(tok)
        done = tok == eos_token_id
        if not done and stop_strings:
            text = tokenizer.decode(out[row][-tail:])
            done = any(s in text for s in stop_strings)
        finished.append(done)
    return finished


def generate_continuations(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    use_cache: bool = True,
    seed: int | None = None,
) -> list[list[int]]:
    """The new tokens of every row (prompt i's samples are rows i*n ... i*n+n-1), each ending at its
    end-of-text token or at the token that completed a stop string, if any."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    _check_request(model, input_ids, max_new_tokens, do_sample, temperature, stop_strings, tokenizer)
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    # A stop string is looked for when the token that completes it arrives, so only the newest tokens need
    # decoding: every token is at least one byte, so a string of b UTF-8 bytes ends in the last b tokens.
    # (Decoding the whole continuation every step would make generation quadratic in its length.)
    tail = max((len(s.encode("utf-8")) for s in stop_strings), default=0) if stop_strings else 0
    was_training = model.training
    model.eval()

    seq = input_ids.to(device).repeat_interleave(num_return_sequences, dim=0)
    rows = list(range(seq.size(0)))  # original row index of each still-active row
    out: list[list[int]] = [[] for _ in range(seq.size(0))]
    cache = KVCache(model.config.n_layer, seq.size(1) + max_new_tokens) if use_cache else None
    step_input = seq
    try:
        for _ in range(max_new_tokens):
            logits, _ = model(step_input if use_cache else seq, kv_cache=cache)
            tokens = _next_tokens(logits[:, -1].float(), do_sample, temperature, top_k, top_p, generator)
            # The step's one wait for the device: the new tokens must reach the host to look for
            # end-of-text and stop strings. Everything that follows decides on the host (lists, not tensors:
            # `finished.any()` on a device tensor would be a second wait).
            finished = _append_tokens(out, rows, tokens.tolist(), eos_token_id, stop_strings, tokenizer, tail)
            if all(finished):
                break
            if any(finished):  # finished rows leave the batch
                kept = [i for i, f in enumerate(finished) if not f]
                rows = [rows[i] for i in kept]
                keep = _to_device(torch.tensor(kept), device)
                tokens, seq = tokens[keep], seq[keep]
                if cache is not None:
                    cache.reorder(keep)
            seq = torch.cat([seq, tokens[:, None]], dim=1)
            step_input = tokens[:, None]
    finally:
        model.train(was_training)
    return out


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **sampling,
) -> torch.LongTensor:
    """Prompt + continuation of every row, (batch * num_return_sequences, prompt + longest continuation).

    `sampling` takes the other options of `generate_continuations` (do_sample, temperature, top_k, top_p,
    stop_strings, tokenizer, use_cache, seed). Rows that stopped early are right-padded with pad_token_id
    (default: eos_token_id, else 0), like transformers' `generate`. All prompts in `input_ids` share one
    length; see `generate_texts` for more.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    conts = generate_continuations(
        model, input_ids, max_new_tokens, num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id, **sampling,
    )
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    width = max(len(c) for c in conts)
    new = torch.full((len(conts), width), pad, dtype=torch.long)
    for i, c in enumerate(conts):
        new[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    prompts = input_ids.cpu().repeat_interleave(num_return_sequences, dim=0)
    return torch.cat([prompts, new], dim=1)


def generate_texts(
    model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64, **kwargs
) -> list[list[str]]:
    """Decoded continuations (num_return_sequences per prompt) of several prompts.

    Prompts with the same token count run together as one batch; results come back in prompt order.
    """
    encoded = [tokenizer.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    n = kwargs.get("num_return_sequences", 1)
    results: list[list[str]] = [[] for _ in prompts]
    for indices in by_length.values():
        batch = torch.tensor([encoded[i] for i in indices], dtype=torch.long)
        conts = generate_continuations(model, batch, max_new_tokens, tokenizer=tokenizer, **kwargs)
        eos = kwargs.get("eos_token_id")
        for j, i in enumerate(indices):
            # The end-of-text token ends the text; it is not part of it.
            rows = conts[j * n:(j + 1) * n]
            results[i] = [tokenizer.decode(c[:-1] if c and c[-1] == eos else c) for c in rows]
    return results


def complete_code(
    model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, num_completions: int = 1,
    **sampling,
) -> list[str]:
    """The book's `complete_code`: sample completions of `prompt`, each cut to its first block.

    Defaults follow the book's demo (temperature 0.4, top_p 0.95, seed 42); keyword arguments override
    them (e.g. do_sample=False for greedy). Generation stops early at CodeParrot's stop strings.
    """
    kwargs = dict(do_sample=True, temperature=0.4, top_k=0, top_p=0.95, seed=42,
                  eos_token_id=getattr(tokenizer, "eos_token_id", None), stop_strings=STOP_STRINGS)
    kwargs.update(sampling)
    conts = generate_texts(model, tokenizer, [prompt], max_new_tokens,
                           num_return_sequences=num_completions, **kwargs)[0]
    return [first_block(c) for c in conts]


def generate_command(args: argparse.Namespace, examples: dict[str, str]) -> None:
    """`minicodeparrot generate`: complete --prompt, --file or (with --examples) the `examples` prompts.

    By default each completion is cut to its first block, as the book's `complete_code`; --full prints
    the whole continuation (up to <|endoftext|> or --max-new-tokens).
    """
    from minicodeparrot.model.gpt import GPT
    from minicodeparrot.tokenizer.bpe import Tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = GPT.from_pretrained(args.model).to(device).eval()
    tok_path = args.tokenizer or args.model
    if args.tokenizer is None and not Path(args.model).is_dir():  # a Hub model repo: its tokenizer.json
        from minicodeparrot.sources import hub

        tok_path = hub.download(args.model, "tokenizer.json", repo_type="model")
    tokenizer = Tokenizer.from_pretrained(tok_path)
    if args.examples:
        prompts = examples
    elif args.file is not None:
        try:
            prompts = {args.file: Path(args.file).read_text(encoding="utf-8")}
        except OSError as e:
            raise UserError(f"cannot read --file {args.file}: {e.strerror}") from None
    else:
        prompts = {"prompt": args.prompt}
    sampling = dict(do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    for name, prompt in prompts.items():
        with inference_precision(device, args.fp32):
            completions = _complete(model, tokenizer, prompt, args, sampling)
        if args.examples:
            print(f"{'#' * 30} {name} {'#' * 30}")
        print(("\n" + "=" * 80 + "\n").join(prompt + c for c in completions))


def _complete(model, tokenizer, prompt: str, args: argparse.Namespace, sampling: dict) -> list[str]:
    if args.full:
        return generate_texts(model, tokenizer, [prompt], args.max_new_tokens,
                              num_return_sequences=args.num_return_sequences,
                              eos_token_id=tokenizer.eos_token_id, **sampling)[0]
    return complete_code(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                         num_completions=args.num_return_sequences, **sampling)
