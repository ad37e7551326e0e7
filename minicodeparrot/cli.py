"""The `minicodeparrot` command line (also `python -m minicodeparrot`).

One function per subcommand adds its arguments and names its handler. Handlers import their
modules lazily so that `minicodeparrot --help` answers at once without importing torch.
A `UserError` from anywhere below is printed as one line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from minicodeparrot.errors import UserError


# --- tokenizer commands (issue: tokenizer) -----------------------------------------------------
def _add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on a dataset")
    p.set_defaults(func=_todo)


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="print the tokens and ids of a file or stdin")
    p.set_defaults(func=_todo)


def _add_tokenizer_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer-report", help="book-style analysis of a trained tokenizer")
    p.set_defaults(func=_todo)


# --- data commands (issue: data) ---------------------------------------------------------------
def _add_make_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-corpus", help="write the standard library as codeparrot-format shards")
    p.set_defaults(func=_todo)


# --- model commands (issue: model) -------------------------------------------------------------
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete code with a trained model")
    p.set_defaults(func=_todo)


# --- training commands (issue: training) -------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (one process; use torchrun for DDP)")
    p.set_defaults(func=_todo)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline quickstart: corpus, tokenizer, tiny model, completions")
    p.set_defaults(func=_todo)


# --- cleaning commands (issue: cleaning) -------------------------------------------------------
def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="CodeParrot cleaning: dedup and filters")
    p.set_defaults(func=_todo)


def _add_pretokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretokenize", help="tokenize a dataset into binary token shards")
    p.set_defaults(func=_todo)


# --- evaluation commands (issue: evaluation) ---------------------------------------------------
def _add_evaluate_loss(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-loss", help="validation loss and perplexity of a model")
    p.set_defaults(func=_todo)


def _add_humaneval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("humaneval", help="HumanEval pass@k in a sandbox")
    p.set_defaults(func=_todo)


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
