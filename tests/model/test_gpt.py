"""GPT-2 model: parameter counts, parity with transformers.GPT2LMHeadModel, checkpoints, checkpointing."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode

from minicodeparrot.errors import UserError
from minicodeparrot.model import gpt as model_module
from minicodeparrot.model.gpt import GPT, GPTConfig

SMALL = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=4)


def _hf_model(**kw):
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SMALL, **kw})).eval()


def _batch(n=2, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (n, t), generator=g)


@pytest.mark.parametrize(
    "preset,vocab,expected",
    [("gpt2", 32768, 111_008_256), ("gpt2", 50257, 124_439_808), ("gpt2-xl", 32768, 1_529_628_800)],
)
def test_parameter_counts_on_meta(preset, vocab, expected):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset, vocab_size=vocab))
        padded = GPT(GPTConfig.from_preset(preset, vocab_size=vocab + 3, pad_vocab_size_multiple=64))
    assert model.num_parameters() == expected
    assert round(model.num_parameters() / 1e6, 1) in (111.0, 124.4, 1529.6)  # the book's rounded figures
    # Padding rows are storage, not parameters of the model.
    assert padded.num_parameters() == expected + 3 * model.config.n_embd
    assert padded.transformer.wte.weight.shape[0] % 64 == 0


def test_presets_and_unknown_preset():
    assert GPTConfig.from_preset("gpt2-medium").n_layer == 24
    assert GPTConfig.from_preset("tiny", vocab_size=8000).n_embd == 128
    large = GPTConfig.from_preset("gpt2-large", vocab_size=32768)
    assert (large.n_embd, large.n_head, large.vocab_size) == (1280, 20, 32768)
    with pytest.raises(UserError, match="unknown model preset"):
        GPTConfig.from_preset("gpt3")


def test_flops_formula_against_torch_flop_counter():
    # An independent count: torch's FlopCounterMode adds up the matmul and attention FLOPs of a real
    # forward + backward. It counts matmuls only, so the formula's 6 FLOPs per token for each bias and
    # LayerNorm parameter (the 1-D parameters) are the one known difference; the attention term it counts
    # over the full T x T square, as the formula does. The textbook loss path (return_logits=True) is
    # counted: the fused loss accumulates grad_weight with an in-place addmm_, which the counter skips.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    B, T = 2, 48
    x = _batch(B, T)
    with FlopCounterMode(display=False) as counter:
        model(x, labels=x, return_logits=True)[1].backward()
    vector_params = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    formula = model.estimate_flops_per_token(T) - 6 * vector_params
    assert counter.get_total_flops() == formula * B * T
    # The default n_positions and the book's figure for codeparrot-small (~0.77 GFLOP per token at 1024).
    with torch.device("meta"):
        small = GPT(GPTConfig.from_preset("gpt2", vocab_size=32768))
    assert small.estimate_flops_per_token() == small.estimate_flops_per_token(1024)
    assert round(small.estimate_flops_per_token() / 1e9, 2) == 0.77


def test_init_statistics():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4, vocab_size=1000))
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / 4) < 3e-4  # 1/sqrt(2*8)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0
    # Tied output layer: the logits of token j are h . wte[j], so a zero row gives zero logits.
    with torch.no_grad():
        model.transformer.wte.weight[7].zero_()
        logits = model(torch.tensor([[1, 2, 3]]))[0]
    assert logits[..., 7].abs().max() == 0 and logits[..., 8].abs().max() > 0
    assert not any("lm_head" in k for k in model.state_dict())
    # A training checkpoint from when the tied head had its own name still loads.
    old = {**model.state_dict(), "lm_head.weight": model.transformer.wte.weight}
    model.load_state_dict(old, strict=True)


MISTRAL = {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}


@pytest.mark.parametrize("tweaks", [{}, MISTRAL])
def test_parity_with_reference_both_ways(tmp_path, tweaks):
    ref = _hf_model(**tweaks)
    ref.save_pretrained(tmp_path / "ref")
    ours = GPT.from_pretrained(tmp_path / "ref").eval()
    assert ours.config.scale_attn_by_inverse_layer_idx == bool(tweaks)
    x = _batch()
    labels = x.clone()
    labels[0, :5] = -100  # ignored positions
    with torch.no_grad():
        logits, loss = ours(x, labels=labels, return_logits=True)
        fused = ours(x, labels=labels)
        out = ref(x, labels=labels)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=0)
    assert fused[0] is None
    torch.testing.assert_close(fused[1], out.loss, atol=1e-6, rtol=0)

    # ...and back: our save_pretrained loads into the reference with identical logits.
    torch.manual_seed(3)
    mine = GPT(GPTConfig(**SMALL, **tweaks)).eval()
    mine.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["activation_function"]) == (
        "gpt2", ["GPT2LMHeadModel"], "gelu_new")
    ref2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert ref2.config.reorder_and_upcast_attn == bool(tweaks)
    with torch.no_grad():
        torch.testing.assert_close(mine(x)[0], ref2(x).logits, atol=1e-5, rtol=0)


def test_layer_idx_scaling_changes_the_output():
    torch.manual_seed(0)
    a = GPT(GPTConfig(**SMALL)).eval()
    b = GPT(GPTConfig(**SMALL, scale_attn_by_inverse_layer_idx=True)).eval()
    b.load_state_dict(a.state_dict())
    x = _batch()
    with torch.no_grad():
        assert not torch.allclose(a(x)[0], b(x)[0], atol=1e-4)


def _upcast_attention(attn, x: torch.Tensor, layer: int) -> torch.Tensor:
    """GPT2LMHeadModel's reorder_and_upcast_attn path, written out: q, k, v from the bf16 projection, then
    scaled scores, causal mask, softmax and the weighted sum of v all in fp32."""
    B, T, C = x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qkv = attn.c_attn(x)
    q, k, v = (t.float().view(B, T, attn.n_head, -1).transpose(1, 2) for t in qkv.split(C, dim=2))
    # GPT-2's 1/sqrt(head size), and Mistral's 1/(layer index + 1).
    scores = (q @ k.transpose(-1, -2)) * (C // attn.n_head) ** -0.5 / (layer + 1)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).to(torch.bfloat16).transpose(1, 2).reshape(B, T, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return attn.c_proj(y)


def test_upcast_attention_runs_in_half_precision_sdpa_with_fp32_softmax(tmp_path, monkeypatch):
    """The 1.5B run's reorder_and_upcast_attn goes through SDPA in bf16 (so a GPU can pick flash attention)
    with the 1/layer factor in `scale`, and still gives the fp32-softmax result within bf16 precision."""
    dtypes = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        dtypes.append(q.dtype)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **MISTRAL, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)).eval()
    # Large scores, as a trained model's sharp attention has: a bf16 softmax would be off by ~0.1 here.
    x = torch.randn(2, 48, SMALL["n_embd"]) * 4
    for layer in (0, 2):  # layer 2 divides its scores by 3 as well
        attn = model.transformer.h[layer].attn
        with torch.no_grad():
            attn.c_attn.weight.mul_(8)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = attn(x)
        with torch.no_grad():
            expected = _upcast_attention(attn, x, layer)
        assert y.dtype == expected.dtype == torch.bfloat16
        # bf16 keeps 8 significant bits: the two differ by the rounding of the attention output only.
        torch.testing.assert_close(y.float(), expected.float(), rtol=2**-7, atol=2e-3)
    assert dtypes == [torch.bfloat16, torch.bfloat16]

    # The whole model against GPT2LMHeadModel with both tweaks (eager attention, the one that honours
    # reorder_and_upcast_attn) under bf16 autocast: the same loss within bf16 precision.
    ref = _hf_model(**MISTRAL, attn_implementation="eager")
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    batch = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = ours(batch, labels=batch)
        ref_loss = ref(batch, labels=batch).loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=4e-3)


def test_pytorch_model_bin_and_unprefixed_keys(tmp_path):
    ref = _hf_model()
    ref.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    # Like OpenAI's original `gpt2` repo: GPT2Model keys without "transformer." plus the old mask buffers.
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    torch.save(state, tmp_path / "a" / "pytorch_model.bin")
    ours = GPT.from_pretrained(tmp_path / "a").eval()
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x).logits, atol=1e-5, rtol=0)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="needs config.json"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a model directory"):
        GPT.from_pretrained(tmp_path / "missing" / "deeper")
    ref = _hf_model()
    ref.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "n_layer": 2}))
    with pytest.raises(UserError, match="unexpected"):
        GPT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(UserError, match="does not fit"):
        GPT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(UserError, match="gelu_new"):
        GPT.from_pretrained(tmp_path / "m")


def test_from_pretrained_hub_repo_id(tmp_path, monkeypatch):
    ref = _hf_model()
    ref.save_pretrained(tmp_path / "cache")
    calls = []

    def download(repo_id, path, cache_dir=None, revision="main", repo_type="dataset"):
        calls.append((repo_id, path, repo_type))
        return tmp_path / "cache" / path

    fake = types.ModuleType("minicodeparrot.sources.hub")
    fake.download = download
    monkeypatch.setitem(sys.modules, "minicodeparrot.sources.hub", fake)
    monkeypatch.setattr("minicodeparrot.sources.hub", fake, raising=False)
    ours = GPT.from_pretrained("someone/tiny-gpt2").eval()
    repo = "someone/tiny-gpt2"
    assert calls == [(repo, "config.json", "model"), (repo, "model.safetensors", "model")]
    with torch.no_grad():
        torch.testing.assert_close(ours(_batch())[0], ref(_batch()).logits, atol=1e-5, rtol=0)


def test_padded_vocab_changes_nothing(tmp_path):
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SMALL)).eval()
    plain.save_pretrained(tmp_path)
    padded = GPT.from_pretrained(tmp_path, pad_vocab_size_multiple=64).eval()
    assert padded.transformer.wte.weight.shape[0] == 128
    assert padded.num_parameters() == plain.num_parameters()
    # Padded rows must never get probability: give them weights that would dominate the softmax.
    with torch.no_grad():
        padded.transformer.wte.weight[SMALL["vocab_size"]:] = 5.0 * torch.randn(27, SMALL["n_embd"])
    x = _batch()
    l1, loss1 = plain(x, labels=x, return_logits=True)
    l2, loss2 = padded(x, labels=x, return_logits=True)
    assert l2.shape[-1] == SMALL["vocab_size"]
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss1, loss2, atol=1e-6, rtol=0)
    loss3 = padded(x, labels=x)[1]  # the fused loss
    torch.testing.assert_close(loss1, loss3, atol=1e-6, rtol=0)
    loss3.backward()
    assert padded.transformer.wte.weight.grad[SMALL["vocab_size"]:].abs().sum() == 0
    # Saved checkpoints drop the padding again.
    padded.save_pretrained(tmp_path / "again")
    assert GPT.from_pretrained(tmp_path / "again").transformer.wte.weight.shape[0] == SMALL["vocab_size"]


def _loss_and_grads(model, x, labels, ours=True, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=labels, **kw)[1] if ours else model(input_ids=x, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _as_ours(hf_grads):
    """The reference's gradients in our layout: nn.Linear weights transposed, no separate lm_head."""
    return {n: g.t() if n.endswith(model_module.CONV1D_SUFFIXES) else g
            for n, g in hf_grads.items() if n != "lm_head.weight"}


@pytest.mark.parametrize("pad", [1, 64])
def test_fused_loss_matches_reference_loss_and_gradients(tmp_path, monkeypatch, pad):
    # Small chunks (3 tokens' worth of logits) so the 60 tokens are split unevenly across 20 chunks.
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 3 * 128)
    ref = _hf_model(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path, pad_vocab_size_multiple=pad).train()
    x = _batch(3, 20)
    labels = x.clone()
    labels[0, :6] = -100  # ignored positions, as the reference ignores them
    labels[2, 11] = -100
    ref_loss, ref_grads = _loss_and_grads(ref, x, labels, ours=False)
    ref_grads = _as_ours(ref_grads)
    for kw in ({}, {"return_logits": True}):
        loss, grads = _loss_and_grads(ours, x, labels, **kw)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            if name == "transformer.wte.weight":
                assert g[SMALL["vocab_size"]:].abs().sum() == 0
                g = g[: SMALL["vocab_size"]]
            torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=0, msg=name)
    # Without autograd (evaluation) the fused loss skips the gradients and gives the same value.
    with torch.no_grad():
        torch.testing.assert_close(ours(x, labels=labels)[1], ref_loss, atol=1e-6, rtol=0)
    # Every label ignored: nan, as the reference's mean over no tokens.
    all_ignored = torch.full_like(x, -100)
    assert torch.isnan(ours(x, labels=all_ignored)[1]) and torch.isnan(ref(x, labels=all_ignored).loss)


def test_fused_loss_under_bf16_autocast_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 7 * 101)
    ref = _hf_model(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).train()
    x = _batch(2, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(ref, x, x, ours=False)
        loss, grads = _loss_and_grads(ours, x, x)
        plain_loss, plain_grads = _loss_and_grads(ours, x, x, return_logits=True)
    ref_grads = _as_ours(ref_grads)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-4)
    torch.testing.assert_close(plain_loss, ref_loss, atol=0, rtol=1e-4)
    for name, g in grads.items():
        # bf16 keeps 8 bits of mantissa (relative error 2^-8 per rounding); through a few layers of
        # backward the gradients of an exact fp32 run differ from the bf16 reference's by 0.3-0.7%
        # (relative norm), and so do ours. A wrong gradient would be off by ~100%.
        r = ref_grads[name]
        assert (g - r).norm() <= 2**-6 * r.norm(), name
        assert (plain_grads[name] - r).norm() <= 2**-6 * r.norm(), name


def test_gradient_checkpointing_same_loss_and_grads():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).train()  # dropout on: checkpointing must replay the same masks
    x = _batch()
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    results = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        saved.clear()
        torch.manual_seed(123)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, labels=x)
        loss.backward()
        results.append(len(saved))
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    plain_saved, (loss_a, grads_a), ckpt_saved, (loss_b, grads_b) = results
    assert ckpt_saved < plain_saved / 3  # checkpointing really keeps fewer activations for backward
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=0)


def test_sequence_longer_than_n_positions_is_refused():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(UserError, match="n_positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_torch_compile_matches_eager(monkeypatch):
    # The aot_eager backend traces with dynamo + AOTAutograd like inductor does, without a C++ build
    # (inductor's CPU compile takes minutes on a shared 2-core machine; GPU runs use the default backend).
    # fullgraph: the fused loss (a custom autograd.Function with a loop over chunks) must not break the graph.
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 10 * 101)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    x = _batch()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    eager_loss, eager_grads = _loss_and_grads(model, x, x)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, x, x)
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=0)
    for name, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads["_orig_mod." + name], g, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, labels=x)[1], eager_loss, atol=1e-6, rtol=0)
    # bf16 autocast (the fused loss reads the autocast state inside the traced function) and activation
    # checkpointing under compile.
    model.gradient_checkpointing = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_bf16 = _loss_and_grads(model, x, x)[0]
        compiled_bf16 = _loss_and_grads(compiled, x, x)[0]
    torch.testing.assert_close(compiled_bf16, eager_bf16, atol=1e-6, rtol=0)
    assert abs(eager_bf16.item() - eager_loss.item()) > 0  # autocast really ran in bf16


# --- Hub model repos over HTTP: tests/hubserver.py serves a saved checkpoint as "owner/tiny-model" ---
HUB_REPO = "owner/tiny-model"


@pytest.fixture
def hub_model(tmp_path, monkeypatch, gpt2_dir):
    """A tiny random GPT (GPT-2's vocab, so the repo's tokenizer.json fits it) served as a Hub model repo."""
    import shutil

    from hubserver import HubServer

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, "vocab_size": 50257})).eval()
    model.save_pretrained(tmp_path / "repo")
    shutil.copy(gpt2_dir / "tokenizer.json", tmp_path / "repo" / "tokenizer.json")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with HubServer(models={HUB_REPO: tmp_path / "repo"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield model, server


def test_from_pretrained_over_http(hub_model, tmp_path):
    model, server = hub_model
    ours = GPT.from_pretrained(HUB_REPO).eval()
    x = _batch()
    with torch.no_grad():
        assert torch.equal(ours(x)[0], model(x)[0])
    assert server.requests_to("/owner/tiny-model/resolve/main/model.safetensors")
    assert server.requests_to("/cdn/models/owner/tiny-model/model.safetensors")  # the LFS redirect
    assert (tmp_path / "hub_cache" / "models--owner--tiny-model" / "main" / "model.safetensors").is_file()
    with pytest.raises(UserError) as err:
        GPT.from_pretrained("owner/no-such-model")
    assert "owner/no-such-model" in str(err.value) and "\n" not in str(err.value)


def test_generate_cli_with_hub_model(hub_model, capsys):
    from minicodeparrot.cli import main
    from minicodeparrot.model.generate import generate_texts
    from minicodeparrot.tokenizer.bpe import Tokenizer

    model, _ = hub_model
    prompt = "def add(a, b):\n"
    main(["generate", "--model", HUB_REPO, "--prompt", prompt, "--greedy", "--full",
          "--max-new-tokens", "8", "--device", "cpu"])
    printed = capsys.readouterr().out
    tokenizer = Tokenizer.from_pretrained(hub_model[1].repos[("models", HUB_REPO)] / "tokenizer.json")
    expected = generate_texts(model, tokenizer, [prompt], 8, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id)[0][0]
    assert expected and printed == prompt + expected + "\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "owner/no-such-model", "--prompt", prompt, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "owner/no-such-model" in capsys.readouterr().err


# --- the course's key-token weighted loss (issue 22) ---------------------------------------------------
def course_keytoken_loss(inputs, logits, keytoken_ids, alpha=1.0):
    """The course's `keytoken_weighted_loss` (chapter 7.6), written out plainly on full logits."""
    shift_labels = inputs[..., 1:]
    shift_logits = logits[..., :-1, :]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           reduction="none")
    loss_per_sample = loss.view(shift_logits.size(0), shift_logits.size(1)).mean(dim=1)
    weights = torch.stack([(inputs == kt).float() for kt in keytoken_ids]).sum(dim=[0, 2])
    weights = alpha * (1.0 + weights)
    return (loss_per_sample * weights).mean()


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_keytoken_loss_equals_the_course_formula_on_reference_logits(tmp_path, monkeypatch, alpha):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 5 * 101)  # 5 tokens a chunk, uneven
    ref = _hf_model(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path, pad_vocab_size_multiple=64).train()
    x = _batch(4, 23)
    key = [3, 17, 42]
    x[0, :5] = 17  # sequences with 0, a few and many key tokens: different weights
    x[2, ::2] = 42
    x[3] = torch.where(torch.isin(x[3], torch.tensor(key)), 0, x[3])
    ref.zero_grad(set_to_none=True)
    expected = course_keytoken_loss(x, ref(input_ids=x).logits, key, alpha)
    expected.backward()
    ref_grads = _as_ours({n: p.grad for n, p in ref.named_parameters()})
    weights = model_module.keytoken_weights(x, torch.tensor(key), alpha)
    assert weights[3].item() == pytest.approx(alpha) and weights[0].item() >= 6 * alpha
    for kw in ({}, {"return_logits": True}):
        loss, grads = _loss_and_grads(ours, x, x, sequence_weights=weights, **kw)
        assert abs(loss.item() - expected.item()) <= 1e-5, kw
        for name, g in grads.items():
            if name == "transformer.wte.weight":
                g = g[: SMALL["vocab_size"]]
            torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=0, msg=name)
    # The plain mean is not what this is: the weights change the value.
    assert abs(ours(x, labels=x)[1].item() - expected.item()) > 1e-3


def test_keytoken_ids_are_the_words_the_reference_encodes_as_one_token(gpt2_dir):
    tokenizers = pytest.importorskip("tokenizers")
    from minicodeparrot.tokenizer.bpe import Tokenizer

    ref = tokenizers.Tokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    words = ["plt", "pd", "sk", "fit", "predict", "testtest"]
    expected = []
    for word in words:
        for text in (word, " " + word):
            ids = ref.encode(text, add_special_tokens=False).ids
            if len(ids) == 1:
                expected.append(ids[0])
    got = model_module.keytoken_ids(Tokenizer.from_pretrained(gpt2_dir), words)
    assert sorted(got) == sorted(expected) and 0 < len(got) < 12  # some words are several tokens


@pytest.mark.slow
def test_keytoken_loss_memory_stays_under_half_the_full_logits_path():
    """Peak memory growth of one fwd+bwd (scripts/bench_model.py's measurement): the weighted fused loss
    against GPT2LMHeadModel's logits fed to the course's formula, where the logits dominate."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_model", Path(__file__).parents[2] / "scripts" / "bench_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = GPTConfig(vocab_size=32768, n_positions=512, n_embd=128, n_layer=1, n_head=4,
                       embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    ours = GPT(config).train()
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict())).train()
    x = torch.randint(0, 32768, (4, 512))
    key = [5, 77, 900]
    weights = model_module.keytoken_weights(x, torch.tensor(key))

    def ours_step():
        ours(x, labels=x, sequence_weights=weights)[1].backward()

    def ref_step():
        course_keytoken_loss(x, ref(input_ids=x).logits, key).backward()

    growth = {}
    for name, step, model in (("ours", ours_step, ours), ("reference", ref_step, ref)):
        step()  # warm-up, then measured with the gradients created inside the step, as in training
        model.zero_grad(set_to_none=True)
        growth[name] = bench.peak_growth_MiB(step, "cpu")
    print(f"keytoken loss peak growth: {growth}, ratio {growth['ours'] / growth['reference']:.2f}")
    assert growth["ours"] <= 0.5 * growth["reference"], growth
