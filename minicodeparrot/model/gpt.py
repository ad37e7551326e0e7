"""GPT-2, written out: the model CodeParrot trains, numerically equal to `transformers.GPT2LMHeadModel`.

Parameter names follow the Hugging Face GPT-2 checkpoints (`transformer.wte`, `transformer.h.0.attn.c_attn`,
...), so loading and saving their files is a rename-free copy. One layout difference: GPT-2's original
TensorFlow code stored its projections as `Conv1D` weights of shape [in, out]; we use `nn.Linear` ([out, in])
and transpose those four matrices (`c_attn`, `c_proj`, `c_fc`, `mlp.c_proj`) when reading or writing files.

A forward pass is: token + learned position embeddings -> n_layer pre-LayerNorm blocks (attention, MLP) ->
final LayerNorm -> logits through the transposed token embedding (tied weights). Training never builds the
full [batch, seq, vocab] logits: `lm_head_loss` computes the loss and its gradients a few hundred tokens at
a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minicodeparrot.errors import UserError

# Architectures. GPT-2's four sizes (OpenAI's release; CodeParrot-small is `gpt2`, CodeParrot 1.5B is
# `gpt2-xl`, both with a 32768-token code vocabulary), and `tiny`, which learns something in CPU minutes.
MODEL_CONFIGS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_positions=256,
                 embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}

# The four projections whose checkpoint layout is Conv1D ([in, out]) rather than nn.Linear ([out, in]).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Tokens per chunk of the fused output-projection + cross-entropy is chosen so a chunk's fp32 logits hold
# about this many elements (64 MiB): small next to the activations of a block, large enough that each
# chunk's three matmuls still keep a GPU busy.
LOSS_CHUNK_ELEMENTS = 2**24
IGNORE_INDEX = -100  # label value that contributes no loss, as in PyTorch and GPT2LMHeadModel


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # Mistral's stability tweaks, used by the CodeParrot 1.5B run: divide attention scores additionally by
    # (layer index + 1), and compute scores + softmax in fp32 even under bf16/fp16 autocast.
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    # Give the embedding matrix a row count that is a multiple of this (64 suits tensor cores); see
    # TokenEmbedding. Results are unchanged and checkpoints store vocab_size rows.
    pad_vocab_size_multiple: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in MODEL_CONFIGS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
        return cls(**{**MODEL_CONFIGS[name], **overrides})

    def to_hf_dict(self) -> dict:
        """The `config.json` of a Hugging Face GPT2LMHeadModel checkpoint."""
        d = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",  # GPT-2's tanh approximation of GELU
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "resid_pdrop": self.resid_pdrop,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": self.initializer_range,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": self.reorder_and_upcast_attn,
            "tie_word_embeddings": True,
            "use_cache": True,
            "torch_dtype": "float32",
        }
        # Written even when unknown (null): otherwise transformers assumes GPT-2's 50256, which is wrong
        # for a tokenizer trained on code (its <|endoftext|> is id 0).
        d["bos_token_id"] = self.bos_token_id
        d["eos_token_id"] = self.eos_token_id
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> GPTConfig:
        act = d.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise UserError(f"config.json has activation_function={act!r}; GPT-2 uses gelu_new")
        n_inner = d.get("n_inner")
        if n_inner is not None and n_inner != 4 * d["n_embd"]:
            raise UserError(f"config.json has n_inner={n_inner}; GPT-2 uses 4*n_embd")
        if not d.get("scale_attn_weights", True) or not d.get("tie_word_embeddings", True):
            raise UserError("config.json disables scale_attn_weights or tie_word_embeddings; GPT-2 uses both")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TokenEmbedding(nn.Embedding):
    """The token embedding, which GPT-2 also uses as its output layer, with room for vocabulary padding.

    GPT-2 ties input and output embeddings: the logits are h @ wte.weight.T, one [vocab, n_embd] matrix
    learned from both ends (25M of CodeParrot-small's 111M parameters; untying would add 25M more).
    The matrix may hold more rows than the vocabulary, rounded up to `pad_to` so the output matmul gets
    tensor-core friendly shapes. This class is the only code that knows it: padded rows start at zero, are
    never looked up (ids < vocab_size), never scored (`lm_head_loss` and `logits` leave them out), are
    dropped when writing a checkpoint and restored when reading one.
    """

    def __init__(self, vocab_size: int, n_embd: int, pad_to: int = 1):
        super().__init__(-(-vocab_size // pad_to) * pad_to, n_embd)
        self.vocab_size = vocab_size

    @property
    def n_padding(self) -> int:
        return self.num_embeddings - self.vocab_size

    def zero_padding_(self) -> None:
        with torch.no_grad():
            self.weight[self.vocab_size:].zero_()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of the real vocabulary (the padded columns are cut off, a view)."""
        return F.linear(h, self.weight)[..., : self.vocab_size]

    def unpadded(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[: self.vocab_size]

    def padded(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight, weight.new_zeros(self.n_padding, weight.shape[1])])


class LMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of h @ weight.T against targets, never holding more than one chunk of logits.

    Plain autograd would keep the [tokens, vocab] logits, their fp32 copy and log-softmax for backward:
    for GPT-2 small at batch 12 x 1024 and vocab 32768 under bf16 autocast that is ~4 GiB. Here each chunk
    of tokens gets its logits, log-sum-exp and loss, and the gradient of its (summed) loss at once, while
    the logits are in hand: d loss / d logits = softmax - one_hot(target), so grad_h = g @ weight and
    grad_weight += g.T @ h. Only grad_h ([tokens, n_embd]) and grad_weight (the size of the weight, which
    gets a gradient anyway) survive to backward, which scales them by grad_output / n_valid. Computing the
    gradient in forward costs no extra FLOPs (recomputing the logits in backward would add a third of the
    head's); a forward without grad (evaluation) skips it.

    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as GPT2LMHeadModel does
    (bf16 logits, upcast before cross-entropy).

    `token_weights` (fp32 [tokens], 0 where ignored) turns the mean into the weighted sum
    sum_i w_i * loss_i, e.g. the course's key-token loss (`lm_head_loss`). Its gradient is the same
    softmax - one_hot, scaled per row by w_i instead of by the mask, so nothing bigger is kept.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, vocab_size: int, with_grad: bool):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        h_c, w_c = h.to(dtype), weight.to(dtype)  # cast once, not per chunk
        n_tokens, n_rows = h.shape[0], weight.shape[0]
        chunk = max(1, LOSS_CHUNK_ELEMENTS // n_rows)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~valid, 0)  # any real class id; the mask zeroes its loss
        scale = valid if token_weights is None else token_weights  # each token's factor in the summed loss
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if with_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        with torch.autocast(device, enabled=False):
            for start in range(0, n_tokens, chunk):
                end = min(start + chunk, n_tokens)
                logits = (h_c[start:end] @ w_c.t()).float()
                if n_rows > vocab_size:  # padded rows exist but are no class: zero probability
                    logits[:, vocab_size:] = float("-inf")
                lse = torch.logsumexp(logits, dim=1)
                t, v = safe_targets[start:end], scale[start:end]
                target_logit = logits.gather(1, t[:, None]).squeeze(1)
                loss_sum += ((lse - target_logit) * v).sum()
                if with_grad:
                    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    g.scatter_add_(1, t[:, None], -valid[start:end, None].to(g.dtype))  # - one_hot
                    g.mul_(v[:, None])
                    g = g.to(dtype)
                    grad_h[start:end] = g @ w_c
                    if dtype == torch.float32:  # accumulate in place: no [vocab, n_embd] temporary
                        grad_w.addmm_(g.t(), h_c[start:end])
                    else:  # one bf16 product per chunk, summed in fp32
                        grad_w += g.t() @ h_c[start:end]
        # The mean divides by the valid targets (0 of them give nan, as F.cross_entropy's mean does);
        # weights already carry their normalisation.
        denominator = valid.sum() if token_weights is None else torch.ones((), device=h.device)
        ctx.save_for_backward(grad_h, grad_w, denominator)
        ctx.weight_dtype = weight.dtype
        return loss_sum / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("LMHeadLoss ran without with_grad=True; its backward has nothing to give")
        scale = grad_output / n_valid
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None


def lm_head_loss(h: torch.Tensor, wte: TokenEmbedding, labels: torch.Tensor,
                 sequence_weights: torch.Tensor | None = None) -> torch.Tensor:
    """GPT2LMHeadModel's causal-LM loss of final hidden states h [B, T, C] against labels [B, T].

    Position t predicts token t+1. As GPT2LMHeadModel does (transformers >= 4.46), the labels are shifted
    rather than the logits: they move one to the left and the last position gets IGNORE_INDEX, so h is
    used whole, without a copy. Positions labelled IGNORE_INDEX (-100) are left out; the loss is the
    mean over the others. With `sequence_weights` [B] it is instead the mean over sequences of
    weight_b * (sequence b's mean token loss): the course's key-token loss (`keytoken_weights`).
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    token_weights = None
    if sequence_weights is not None:
        valid = (shifted != IGNORE_INDEX).float()
        per_token = sequence_weights.float() / (valid.sum(1) * labels.shape[0])
        token_weights = (valid * per_token[:, None]).reshape(-1)
    h = h.reshape(-1, h.size(-1))
    with_grad = torch.is_grad_enabled() and (h.requires_grad or wte.weight.requires_grad)
    return LMHeadLoss.apply(h, wte.weight, shifted.reshape(-1), token_weights, wte.vocab_size, with_grad)


def keytoken_ids(tokenizer, words: list[str]) -> list[int]:
    """The ids of `words`, with and without a leading space, that the tokenizer encodes as one token
    (the course's key tokens; a word split into several tokens cannot be counted as one)."""
    ids = []
    for word in words:
        for text in (word, " " + word):
            encoded = tokenizer.encode(text)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
    return ids


def keytoken_weights(input_ids: torch.Tensor, key_ids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """[B] weights alpha * (1 + occurrences of the key tokens in each sequence), as the course's
    `keytoken_weighted_loss` counts them: over the whole input, the first token (which is no target)
    included."""
    return alpha * (1.0 + torch.isin(input_ids, key_ids).sum(1).float())


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        # One matmul for query, key and value, as GPT-2's checkpoints store them ([q | k | v] along the
        # output dimension), so the weights load without being split.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.layer_idx = layer_idx
        # GPT-2 scales scores by 1/sqrt(head size) (scale_attn_weights, always on). Mistral's
        # scale_attn_by_inverse_layer_idx divides layer i's scores by i+1 as well: deep layers' residual
        # stream grows, so their raw scores would grow too and saturate softmax in half precision.
        self.scale = (config.n_embd // config.n_head) ** -0.5
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Training and the first (prompt) step of generation see square causal attention. Later generation
        # steps append to the cache and attend to every earlier position; is_causal would be wrong there
        # (SDPA aligns a non-square causal mask top-left), so those steps pass an explicit mask.
        is_causal, mask = True, None
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)
            if past > 0:
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # SDPA takes dropout as an argument, not a module: it must be turned off by hand in eval mode.
        dropout_p = self.attn_pdrop if self.training else 0.0
        # reorder_and_upcast_attn (the 1.5B run's guard against half-precision overflow of q.k: scores and
        # softmax in fp32) needs no code of its own: every SDPA kernel computes the scores and the softmax
        # in fp32 from bf16/fp16 inputs (flash, memory-efficient and cuDNN accumulate in fp32 registers; the
        # math fallback upcasts unless torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp is set), and
        # the extra 1/layer factor is part of `scale`. Upcasting q, k, v to fp32 here instead, as
        # GPT2LMHeadModel's eager path does, would rule out the flash kernels, which take only half precision.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: [h0 | h1 | ...]
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # GPT-2's n_inner is always 4 * n_embd (config.json's n_inner: null); other widths are refused.
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is GELU's tanh approximation; the exact erf GELU differs by ~1e-3 and would
        # break parity with the released weights.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        # Pre-LayerNorm (GPT-2's change from GPT-1): each branch sees a normalised input while the residual
        # stream itself is never normalised, so gradients reach early layers undamped; the stream gets its
        # one LayerNorm at the very end (ln_f).
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to `max_len`.

    Generation then feeds one new token per step instead of the whole sequence: its query attends to the
    cached keys and values, which do not change once computed (attention is causal).
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0  # positions already stored; advanced by GPT.forward after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:  # allocated on first use, in the dtype attention runs in (autocast aware)
            B, H, _, D = k.shape
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (generation drops finished sequences)."""
        self.k = [t[index] for t in self.k]
        self.v = [t[index] for t in self.v]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.transformer = nn.ModuleDict(dict(
            wte=TokenEmbedding(config.vocab_size, config.n_embd, config.pad_vocab_size_multiple),
            wpe=nn.Embedding(config.n_positions, config.n_embd),  # learned positions, GPT-2's choice
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        # No lm_head module: the output layer is wte itself (tied), see TokenEmbedding.
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, so their output projections start
        # 1/sqrt(2 * n_layer) smaller to keep the residual stream's variance independent of depth.
        std = config.initializer_range / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std)
        self.transformer.wte.zero_padding_()
        self.register_load_state_dict_pre_hook(_drop_tied_lm_head)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's N(0, 0.02) for every matrix and embedding, zero biases; LayerNorms keep (1, 0).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Trainable parameters as the book counts them: tied weights once, vocab padding not at all."""
        wte = self.transformer.wte
        n = sum(p.numel() for p in self.parameters()) - wte.n_padding * wte.embedding_dim
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel() + wte.vocab_size * wte.embedding_dim
        return n

    def estimate_flops_per_token(self, seq_length: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, PaLM appendix B: 6*N + 12*L*H*Q*T.

        N counts every parameter used in a matmul: all but the position embeddings (a lookup), with the
        tied token embedding counted once for the output projection. 6N is 2 FLOPs per multiply-add times
        3 for forward + backward; 12*L*H*Q*T adds the attention scores and weighted values (L layers,
        H heads, Q head size, T = seq_length, default n_positions), counted over the full T x T square as
        PaLM does, although causal attention needs only half. Biases and LayerNorm parameters are in N
        too (6 FLOPs each per token; < 0.1% of N). MFU = tokens/s * this / peak FLOP/s.
        """
        c = self.config
        T = seq_length or c.n_positions
        N = self.num_parameters() - self.transformer.wpe.weight.numel()
        return 6 * N + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, kv_cache: KVCache | None = None,
        return_logits: bool = False, sequence_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, loss): logits [B, T, vocab_size] or None, loss a scalar or None.

        Without labels: (logits, None). With labels: the mean causal-LM loss of GPT2LMHeadModel, and by
        default no logits, (None, loss): the loss is then computed chunk by chunk from the hidden states
        (`lm_head_loss`) and the full logits never exist. `return_logits=True` gives both, the loss then
        from the full logits (cross-entropy on them, the textbook way; same value). `sequence_weights` [B]
        weight each sequence's mean loss (see `lm_head_loss`).
        """
        B, T = input_ids.shape
        past = kv_cache.pos if kv_cache is not None else 0
        # GPT-2's positions are a learned table, not a formula: there is no embedding past n_positions.
        if past + T > self.config.n_positions:
            raise UserError(
                f"sequence of {past + T} tokens exceeds the model's n_positions={self.config.n_positions}; "
                "shorten the input"
            )
        # With a KV cache, the new tokens sit after the `past` ones already stored.
        pos = torch.arange(past, past + T, device=input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and kv_cache is None:
                # Keep only each block's input; recompute its activations during backward. Non-reentrant
                # checkpointing restores the RNG state, so dropout masks (and thus grads) are identical.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        if labels is None:
            return self.transformer.wte.logits(x), None
        if not return_logits:
            return None, lm_head_loss(x, self.transformer.wte, labels, sequence_weights)
        logits = self.transformer.wte.logits(x)
        # The same shifted labels as lm_head_loss: position t predicts token t+1, the last predicts nothing.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if sequence_weights is None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
            return logits, loss
        per_token = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                                    reduction="none")
        per_sequence = per_token.sum(1) / (targets != IGNORE_INDEX).sum(1)
        return logits, (per_sequence * sequence_weights).mean()

    # --- Hugging Face checkpoint layout -------------------------------------------------------------
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights as a GPT2LMHeadModel checkpoint stores them: Conv1D layout, no lm_head (it is tied)."""
        out = {}
        for name, p in self.state_dict().items():
            t = p.detach()
            if name == "transformer.wte.weight":
                t = self.transformer.wte.unpadded(t)
            if name.endswith(CONV1D_SUFFIXES):
                t = t.t()
            out[name] = t.contiguous().cpu()
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        from minicodeparrot.model.safetensors_io import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hf_config = self.config.to_hf_dict()
        hf_config["torch_dtype"] = str(self.transformer.wte.weight.dtype).removeprefix("torch.")
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(self.hf_state_dict(), directory / "model.safetensors", metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = torch.float32, **config_overrides
    ) -> GPT:
        """Load a GPT-2 checkpoint: a local directory, or a Hub model repo id ("owner/name").

        `config_overrides` change training-only settings such as dropout or pad_vocab_size_multiple.
        `dtype=None` keeps the dtype stored in the file.
        """
        config_path, weights_path = _resolve_checkpoint(path)
        config = GPTConfig.from_hf_dict(json.loads(Path(config_path).read_text()))
        for k, v in config_overrides.items():
            setattr(config, k, v)
        # Build on the meta device and adopt the loaded tensors: no time spent on a random init that
        # would be overwritten (noticeable for the 1.5B model).
        with torch.device("meta"):
            model = cls(config)
        state = _read_weights(weights_path)
        state = convert_hf_state_dict(state, config, weights_path)
        wte = state["transformer.wte.weight"]
        if wte.shape[0] != config.vocab_size:
            raise UserError(f"{weights_path}: wte has {wte.shape[0]} rows, config.json: "
                            f"vocab_size={config.vocab_size}")
        state["transformer.wte.weight"] = model.transformer.wte.padded(wte)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:  # shape mismatches: the weights do not belong to this config.json
            detail = str(e).splitlines()[-1].strip()
            raise UserError(f"{weights_path} does not fit its config.json: {detail}") from None
        return model


def _drop_tied_lm_head(module, state_dict, prefix, *args) -> None:
    """Training checkpoints written before the model lost its `lm_head` alias hold `lm_head.weight`, a
    second name for wte's tensor; dropping it lets them resume (strict loading would refuse the key)."""
    state_dict.pop(prefix + "lm_head.weight", None)


def convert_hf_state_dict(
    state: dict[str, torch.Tensor], config: GPTConfig, source: object
) -> dict[str, torch.Tensor]:
    """Map a Hugging Face GPT-2 state dict onto our parameter names and nn.Linear layout (vocab unpadded)."""
    # Checkpoints saved from GPT2Model (e.g. OpenAI's original `gpt2` repo) lack the "transformer." prefix.
    if not any(k.startswith("transformer.") for k in state):
        state = {("transformer." + k if k != "lm_head.weight" else k): v for k, v in state.items()}
    # Old checkpoints also store the causal-mask buffers `attn.bias` / `attn.masked_bias`; they hold no
    # learned values (we build the mask in SDPA), so they are dropped on purpose.
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    lm_head = state.pop("lm_head.weight", None)
    expected = {f"transformer.{k}" for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    expected |= {f"transformer.h.{i}.{s}" for i in range(config.n_layer) for s in _BLOCK_KEYS}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"{source} does not match a GPT-2 of this config.json: {len(missing)} missing tensors "
            f"({', '.join(missing[:3])}) and {len(unexpected)} unexpected ({', '.join(unexpected[:3])})"
        )
    # GPT-2 ties lm_head to wte; a checkpoint may store the tied copy, which must then really be a copy.
    if lm_head is not None and not torch.equal(lm_head, state["transformer.wte.weight"]):
        raise UserError(f"{source}: lm_head.weight differs from wte; only tied GPT-2 heads are supported")
    # GPT-2 was written in TensorFlow with `Conv1D` layers (x @ W, W: [in, out]); nn.Linear keeps [out, in].
    return {k: (v.t() if k.endswith(CONV1D_SUFFIXES) else v).contiguous() for k, v in state.items()}


_BLOCK_KEYS = [
    f"{m}.{p}"
    for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    for p in ("weight", "bias")
]


def _resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a local directory, or of a Hub model repo downloaded into the cache."""
    local = Path(path)
    if local.is_dir():
        candidates = [local / n for n in ("model.safetensors", "pytorch_model.bin") if (local / n).is_file()]
        weights = candidates[0] if candidates else None
        if not (local / "config.json").is_file() or weights is None:
            raise UserError(f"{local} needs config.json and model.safetensors (or pytorch_model.bin)")
        return local / "config.json", weights
    if local.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise UserError(f"{path} is not a model directory (config.json + model.safetensors) or a Hub repo id")
    from minicodeparrot.sources import hub

    config_path = hub.download(str(path), "config.json", repo_type="model")
    try:
        weights = hub.download(str(path), "model.safetensors", repo_type="model")
    except hub.HubNotFound:  # older repos have only the pickle; a network failure is reported as is
        weights = hub.download(str(path), "pytorch_model.bin", repo_type="model")
    return Path(config_path), Path(weights)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from minicodeparrot.model.safetensors_io import load_file

        return load_file(path)
    try:
        # weights_only: a .bin is a pickle, and unpickling an untrusted file can run arbitrary code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable/unsafe pickle is the user's file problem
        raise UserError(f"cannot load {path} safely with torch.load(weights_only=True): {e}") from None
