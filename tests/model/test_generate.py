"""Generation: KV cache vs. recomputation vs. transformers' greedy output, sampling filters, stop strings."""

from __future__ import annotations

import pytest
import tokenizers
import torch
import transformers

from minicodeparrot.errors import UserError
from minicodeparrot.model.generate import (
    STOP_STRINGS,
    complete_code,
    first_block,
    generate,
    generate_continuations,
    generate_texts,
    top_k_filter,
    top_p_filter,
)
from minicodeparrot.model.gpt import GPT, GPTConfig
from minicodeparrot.tokenizer.trainer import BYTE_LEVEL_ALPHABET, train_bpe


class CharTokenizer:
    """Stand-in tokenizer: one token per printable ASCII character, id 0 = <|endoftext|>."""

    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 31 if c != "\n" else 96 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("" if i == 0 else "\n" if i == 96 else chr(i + 31) for i in ids)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our model and the reference with identical weights (random init, vocab 97 = CharTokenizer).

    The matrices are scaled up from GPT-2's init (std 0.02): at that init a greedy row repeats one
    token whatever came before, so a KV cache holding another row's keys would go unnoticed.
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    d = tmp_path_factory.mktemp("m")
    model.save_pretrained(d)
    return model, transformers.GPT2LMHeadModel.from_pretrained(d).eval()


def test_greedy_cache_nocache_and_reference_agree(pair):
    model, ref = pair
    x = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    with_cache = generate(model, x, 30)
    without = generate(model, x, 30, use_cache=False)
    expected = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, expected)
    assert with_cache.shape == (3, 39)


def test_sampling_is_seeded_and_cache_independent(pair):
    model, _ = pair
    x = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, num_return_sequences=3)
    a = generate(model, x, 25, seed=7, **kw)
    assert a.shape == (6, 30)
    assert torch.equal(a, generate(model, x, 25, seed=7, **kw))
    assert torch.equal(a, generate(model, x, 25, seed=7, use_cache=False, **kw))
    assert not torch.equal(a, generate(model, x, 25, seed=8, **kw))
    assert torch.equal(a[:3, :5], x[:1].expand(3, 5))  # rows i*n..i*n+n-1 continue prompt i


def test_eos_stops_a_row_and_pads(pair):
    model, _ = pair
    x = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    free = generate(model, x, 20)[0, 6:]
    eos = int(free[4])  # pretend the 5th greedy token is end-of-text
    out = generate(model, x, 20, eos_token_id=eos, pad_token_id=-1)[0, 6:]
    stop = (free == eos).nonzero()[0].item()
    assert out.tolist() == free[: stop + 1].tolist()  # stopped right after eos, loop ended early


def _token_only_in_row(free: torch.Tensor, row: int, start: int) -> tuple[int, int] | None:
    """(position, token) of the first token of `row`'s continuation, from `start` on, that no other
    row's continuation contains (nor `row` before it): made the end-of-text token, it makes `row`, and
    only `row`, finish early. None when the greedy rows share every token."""
    others = {t for r in range(free.size(0)) if r != row for t in free[r].tolist()}
    for k in range(start, free.size(1)):
        token = int(free[row, k])
        if token not in others and token not in free[row, :k].tolist():
            return k, token
    return None


def _prompts_with_a_row_ending_early(model) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Three prompts whose middle row, and only it, produces some token; the first seed that gives one."""
    for seed in range(5, 105):
        x = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(seed))
        free = generate(model, x, 30)[:, 7:]
        found = _token_only_in_row(free, row=1, start=3)
        if found is not None:
            return x, free, *found
    raise AssertionError("no prompts among 100 seeds make only the middle row produce a token")


def test_a_row_leaving_the_batch_keeps_the_others_right(pair):
    """The middle row of three finishes early and leaves the batch (the KV cache is reordered); the rows
    that go on must still match transformers, which keeps every row to the end, and generating alone."""
    model, ref = pair
    x, free, k, eos = _prompts_with_a_row_ending_early(model)
    out = generate(model, x, 30, eos_token_id=eos, pad_token_id=0)
    expected = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)
    assert out[1, 7:].tolist() == free[1, : k + 1].tolist() + [0] * (29 - k)  # row 1 stopped at step k < 29
    for r in (0, 2):  # ran all 30 steps, most of them after row 1 had left
        assert out[r, 7:].tolist() == free[r].tolist()
        assert torch.equal(out[r], generate(model, x[r : r + 1], 30, eos_token_id=eos)[0])


def test_stop_strings_per_row(pair):
    model, _ = pair
    tok = CharTokenizer()
    # Prompts where greedy row 0 produces a string, after a few characters, that row 1 never does.
    for seed in range(4, 104):
        x = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(seed))
        free = generate(model, x, 30)
        text0, text1 = (tok.decode(free[r, 6:].tolist()) for r in (0, 1))
        pairs = (text0[i : i + 2] for i in range(3, len(text0) - 1))
        stop = next((p for p in pairs if p not in text1), None)
        if stop is not None:
            break
    assert stop is not None, "no prompts among 100 seeds give row 0 a string of its own"
    out = generate(model, x, 30, stop_strings=[stop], tokenizer=tok, pad_token_id=0)
    cont0 = tok.decode(out[0, 6:].tolist())
    assert cont0 == text0[: text0.index(stop) + len(stop)] and len(cont0) < 30
    assert tok.decode(out[1, 6:].tolist()) == text1  # the other row went on, unaffected
    with pytest.raises(UserError, match="tokenizer"):
        generate(model, x, 5, stop_strings=[stop])


def test_n_positions_and_bad_arguments(pair):
    model, _ = pair
    x = torch.ones(1, 60, dtype=torch.long)
    with pytest.raises(UserError, match="n_positions"):
        generate(model, x, 5)
    assert generate(model, x, 4).shape == (1, 64)
    with pytest.raises(UserError, match="temperature"):
        generate(model, x[:, :3], 2, do_sample=True, temperature=0)


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert top_k_filter(logits, 2).isfinite().tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_filter_matches_reference_warper():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()
    kept = top_p_filter(logits, 0.8).isfinite()
    assert kept.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert top_p_filter(logits, 0.81).isfinite()[0].tolist() == [True, False, True, True]
    assert top_p_filter(logits, 1.0).isfinite().all()
    warper = transformers.TopPLogitsWarper(0.9)
    g = torch.Generator().manual_seed(0)
    random_logits = torch.randn(4, 50, generator=g) * 3
    ref_kept = warper(None, random_logits.clone()).isfinite()
    assert torch.equal(top_p_filter(random_logits, 0.9).isfinite(), ref_kept)


def test_first_block():
    completion = "\n    return width * height\n\n\ndef other():\n    pass\n"
    assert first_block(completion) == "\n    return width * height"
    assert first_block("    x = 1\n# comment\n") == "    x = 1"
    assert first_block("    y = 2\n") == "    y = 2"
    assert "\nprint" in STOP_STRINGS and len(STOP_STRINGS) == 6


def test_complete_code_and_batched_prompts(pair):
    model, _ = pair
    tok = CharTokenizer()
    prompts = ["def f(x):\n", "def g(y):\n", "import os\n"]  # two share a length, one batch of 2 + 1
    together = generate_texts(model, tok, prompts, 12, do_sample=False)
    alone = [generate_texts(model, tok, [p], 12, do_sample=False)[0] for p in prompts]
    assert together == alone
    completions = complete_code(model, tok, prompts[0], max_new_tokens=20, num_completions=3)
    assert len(completions) == 3
    assert all(not any(s in c for s in STOP_STRINGS) for c in completions)
    assert completions == complete_code(model, tok, prompts[0], max_new_tokens=20, num_completions=3)


def test_cli_generate_examples_and_prompt(tmp_path, gpt2_dir, capsys):
    from minicodeparrot.cli import main

    torch.manual_seed(0)
    tiny = GPTConfig(vocab_size=50257, n_positions=128, n_embd=16, n_layer=1, n_head=2)
    GPT(tiny).save_pretrained(tmp_path)
    main(["generate", "--model", str(tmp_path), "--tokenizer", str(gpt2_dir), "--examples",
          "--max-new-tokens", "6", "--device", "cpu"])
    out = capsys.readouterr().out
    for name in ("area_of_rectangle", "get_urls_from_html", "numpy_mean", "sklearn_random_forest"):
        assert name in out
    assert "def area_of_rectangle(width: float, height: float) -> float:" in out
    main(["generate", "--model", str(tmp_path), "--tokenizer", str(gpt2_dir), "--prompt", "def add(a, b):\n",
          "--greedy", "--num-return-sequences", "2", "--max-new-tokens", "5", "--device", "cpu"])
    first, second = capsys.readouterr().out.split("\n" + "=" * 80 + "\n")
    assert first.startswith("def add(a, b):\n") and first.strip() == second.strip()  # greedy: identical
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert e.value.code == 2


# A short module for a tiny model to learn by heart: its greedy continuation of a prefix ending in a
# `def` line is that function's body followed by the next function, which the stop string "\ndef" must cut.
OPERATORS = [("add", "+"), ("sub", "-"), ("mul", "*"), ("div", "/"), ("mod", "%"), ("power", "**")]
MODULE = "".join(f"def {name}(a, b):\n    return a {op} b\n\n\n" for name, op in OPERATORS)


def _prefix(name: str) -> str:
    """MODULE up to and including the `def` line of function `name`, without its newline."""
    return MODULE[: MODULE.index(f"def {name}(a, b):") + len(f"def {name}(a, b):")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(our model, our tokenizer, directory): a 2-layer GPT and a 300-token byte-level BPE trained on
    MODULE (150 full-batch steps, ~2 s on one idle thread), saved as `minicodeparrot train` saves models.

    A random model's greedy output repeats one token or is blank; this one writes code, so an empty or
    truncated completion cannot pass for the reference's.
    """
    tokenizer = train_bpe([MODULE], 300, initial_alphabet=BYTE_LEVEL_ALPHABET, show_progress=False,
                          num_workers=1)
    ids = torch.tensor([tokenizer.encode(MODULE)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs several times faster on one thread of a busy machine
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(150):
            _, loss = model(ids, labels=ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05  # learnt by heart
    d = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return model, tokenizer, d


@pytest.fixture(scope="module")
def reference(trained):
    """The saved model and tokenizer as transformers and `tokenizers` load them: nothing of ours."""
    d = trained[2]
    return transformers.GPT2LMHeadModel.from_pretrained(d).eval(), tokenizers.Tokenizer.from_file(
        str(d / "tokenizer.json"))


def _reference_continuation(reference, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """transformers' greedy continuation of `prompt`, tokenized and decoded by the `tokenizers` library."""
    ref, ref_tok = reference
    ids = torch.tensor([ref_tok.encode(prompt).ids])
    eos = ref_tok.token_to_id("<|endoftext|>")
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                       do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, ids.size(1):].tolist()
    return out, ref_tok.decode(out)


def test_greedy_generate_and_complete_code_equal_transformers(trained, reference):
    model, tokenizer, d = trained
    for name, body in [("add", "\n    return a + b"), ("div", "\n    return a / b")]:
        prompt = _prefix(name)
        ref_ids, ref_text = _reference_continuation(reference, prompt, 24)
        # The reference writes the body, then goes on into the next function: the cut has work to do.
        assert ref_text.startswith(body + "\n\n\ndef ") and len(ref_ids) == 24
        prompt_ids = torch.tensor([tokenizer.encode(prompt)])
        ours = generate(model, prompt_ids, 24)
        assert ours[0, prompt_ids.size(1):].tolist() == ref_ids
        completion = complete_code(model, tokenizer, prompt, max_new_tokens=24, do_sample=False)
        assert completion == [ref_text.split("\ndef")[0].rstrip()] == [body]  # cut at its first stop string


def test_cli_greedy_generate_equals_transformers(trained, reference, capsys):
    from minicodeparrot.cli import main

    _, _, d = trained
    prompt = _prefix("mul")
    _, ref_text = _reference_continuation(reference, prompt, 24)
    assert ref_text.startswith("\n    return a * b\n\n\ndef div")
    main(["generate", "--model", str(d), "--prompt", prompt, "--greedy", "--max-new-tokens", "24",
          "--device", "cpu"])
    assert capsys.readouterr().out == prompt + ref_text.split("\ndef")[0].rstrip() + "\n"
    main(["generate", "--model", str(d), "--prompt", prompt, "--greedy", "--max-new-tokens", "24", "--full",
          "--device", "cpu"])
    assert capsys.readouterr().out == prompt + ref_text + "\n"


def test_generation_waits_for_the_device_once_per_token(pair, monkeypatch):
    """Count what makes the host wait for a GPU (a value read back: .tolist(), .item(), bool(t), ...,
    nonzero's data-dependent shape), called from the model package, while sampling with a row leaving the
    batch and stop strings: at most one per generated token (on a CPU the calls are the same ones)."""
    import sys
    from pathlib import Path

    import minicodeparrot.model as model_package

    package = str(Path(model_package.__file__).parent)
    counts = {"n": 0}
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy",
                 "nonzero", "any", "all"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, **k):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    model, _ = pair
    x, free, k, eos = _prompts_with_a_row_ending_early(model)
    counts["n"] = 0
    out = generate_continuations(model, x, 30, eos_token_id=eos)
    assert [len(c) for c in out] == [30, k + 1, 30]  # row 1 left the batch early: the reorder path ran
    assert counts["n"] == 30  # one read per generated token
    counts["n"] = 0
    texts = generate_texts(model, CharTokenizer(), ["def f(x):"], 20, do_sample=True, seed=3,
                           num_return_sequences=3, stop_strings=STOP_STRINGS, eos_token_id=0)
    assert len(texts[0]) == 3 and 1 <= counts["n"] <= 20


def test_inference_precision_is_bf16_with_tf32_on_a_gpu_and_fp32_elsewhere():
    import contextlib

    from minicodeparrot.cli import build_parser
    from minicodeparrot.model.generate import inference_precision

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
            gpu = inference_precision("cuda")  # a CPU build warns that CUDA autocast is unavailable
        assert isinstance(gpu, torch.autocast) and gpu.device == "cuda" and gpu.fast_dtype == torch.bfloat16
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        off = inference_precision(torch.device("cuda", 0), fp32=True)
        assert not isinstance(off, torch.autocast) and not torch.backends.cuda.matmul.allow_tf32
        assert not isinstance(inference_precision("cpu"), torch.autocast)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    for command in (["generate", "--model", "m", "--prompt", "x"], ["humaneval", "--model", "m"],
                    ["evaluate-loss", "--model", "m", "--dataset", "d"]):
        assert build_parser().parse_args([*command, "--fp32"]).fp32
        assert not build_parser().parse_args(command).fp32
