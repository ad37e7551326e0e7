"""training/validation.py: the validation loss is the exact token mean, whatever the batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minicodeparrot.errors import UserError
from minicodeparrot.training import validation as ev


class _TinyLM(torch.nn.Module):
    """A stand-in with GPT's forward contract: (logits, mean loss of position t predicting t+1)."""

    def __init__(self, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.out = torch.nn.Linear(16, vocab)

    def forward(self, input_ids, labels=None):
        logits = self.out(self.emb(input_ids))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        return logits, loss


def test_evaluate_loss_is_the_token_mean_over_uneven_batches():
    model = _TinyLM()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50, (b, 9), generator=g) for b in (4, 4, 1)]  # a short last batch
    result = ev.evaluate_loss(model, batches)
    logits = model.out(model.emb(torch.cat(batches)))
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 50), torch.cat(batches)[:, 1:].reshape(-1)).item()
    assert result["loss"] == pytest.approx(manual, rel=1e-6)
    assert result["tokens"] == 9 * 8 and result["batches"] == 3
    assert result["perplexity"] == pytest.approx(torch.tensor(manual).exp().item(), rel=1e-6)
    assert ev.evaluate_loss(model, batches, max_eval_steps=1)["batches"] == 1
    with pytest.raises(UserError):
        ev.evaluate_loss(model, [])


def test_perplexity_overflows_to_inf():
    assert ev.perplexity(1000.0) == float("inf")
    assert ev.perplexity(0.0) == 1.0
