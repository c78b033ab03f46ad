"""The two LLaDA losses against a hand computation on tiny batches.

The "model" is a fixed table of logits, so the only thing under test is the
objective: which tokens get hidden, the 1/p weights, and the normalisation.
The draws are replayed from a generator with the same seed and the loss is
recomputed with scalar Python math, one token at a time.
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from objectives import EPS, forward_process, pretrain_loss, random_length, sft_loss  # noqa: E402

MASK = 5
VOCAB = 6


class FixedLogits:
    """Returns logits that depend only on (row, position), whatever the input;
    remembers the input it saw."""

    def __init__(self, b, n, seed=3):
        self.table = torch.randn(b, n, VOCAB, generator=torch.Generator().manual_seed(seed))
        self.seen = None

    def __call__(self, ids):
        self.seen = ids.clone()
        return self.table[:, : ids.shape[1]]


def log_softmax_at(row, k):
    m = max(row)
    return row[k] - m - math.log(sum(math.exp(v - m) for v in row))


def test_pretrain_loss_matches_hand_computation():
    ids = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    model = FixedLogits(2, 4)
    loss, n_hidden = pretrain_loss(model, ids, MASK, torch.Generator().manual_seed(7))

    # Replay the draws: t per sequence, then one uniform per token.
    g = torch.Generator().manual_seed(7)
    t = torch.rand(2, generator=g).tolist()
    u = torch.rand((2, 4), generator=g).tolist()
    total, hidden = 0.0, 0
    for b in range(2):
        p = (1 - EPS) * t[b] + EPS
        for i in range(4):
            if u[b][i] < p:
                hidden += 1
                assert model.seen[b, i] == MASK
                total += -log_softmax_at(model.table[b, i].tolist(), int(ids[b, i])) / p
            else:
                assert model.seen[b, i] == ids[b, i]
    assert n_hidden == hidden > 0
    assert math.isclose(loss.item(), total / (2 * 4), rel_tol=1e-6)


def test_uniform_logits_give_log_v_over_p_per_hidden_token():
    """Uniform logits: every hidden token costs log(V)/p, so the loss is n log(V) / p / L."""
    ids = torch.tensor([[1, 2, 3, 4, 0, 1, 2, 3]])
    loss, n = pretrain_loss(lambda x: torch.zeros(1, 8, VOCAB), ids, MASK, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    p = (1 - EPS) * torch.rand(1, generator=g).item() + EPS
    assert math.isclose(loss.item(), n * math.log(VOCAB) / p / 8, rel_tol=1e-6)


def test_sft_loss_matches_hand_computation():
    # Row 0: prompt of 2, response 3 then EOS padding (id 4) to the batch length.
    ids = torch.tensor([[0, 1, 2, 3, 4, 4], [1, 0, 0, 2, 3, 4]])
    prompt_len = torch.tensor([2, 3])
    model = FixedLogits(2, 6)
    loss, n_hidden = sft_loss(model, ids, prompt_len, MASK, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    t = torch.rand(2, generator=g).tolist()
    u = torch.rand((2, 6), generator=g).tolist()
    total, hidden = 0.0, 0
    for b in range(2):
        p = (1 - EPS) * t[b] + EPS
        answer_len = 6 - int(prompt_len[b])
        for i in range(6):
            if i < prompt_len[b]:
                assert model.seen[b, i] == ids[b, i], "the prompt is never hidden"
            elif u[b][i] < p:
                hidden += 1
                assert model.seen[b, i] == MASK
                total += -log_softmax_at(model.table[b, i].tolist(), int(ids[b, i])) / p / answer_len
            else:
                assert model.seen[b, i] == ids[b, i]
    assert n_hidden == hidden > 0
    assert math.isclose(loss.item(), total / 2, rel_tol=1e-6)


def test_sft_hides_the_eos_padding_too():
    ids = torch.tensor([[0, 1, 2, 4, 4, 4, 4, 4]])
    seen_masked_padding = False
    for seed in range(20):
        model = FixedLogits(1, 8)
        sft_loss(model, ids, torch.tensor([2]), MASK, torch.Generator().manual_seed(seed))
        seen_masked_padding |= bool((model.seen[0, 3:] == MASK).any())
        assert (model.seen[0, :2] == ids[0, :2]).all()
    assert seen_masked_padding


def test_masking_rate_follows_t():
    ids = torch.zeros(4000, 64, dtype=torch.long)
    _, hidden, p = forward_process(ids, MASK, torch.Generator().manual_seed(1))
    # Per sequence the hidden share estimates p; over sequences p is ~U(eps, 1).
    share = hidden.float().mean(1)
    assert (share - p[:, 0]).abs().mean() < 0.06
    assert abs(p[:, 0].mean().item() - 0.5) < 0.02


def test_random_length_cuts_about_one_percent_of_batches():
    ids = torch.zeros(2, 50, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    lengths = [random_length(ids, g).shape[1] for _ in range(20000)]
    cut = [n for n in lengths if n != 50]
    assert 120 < len(cut) < 290, len(cut)
    assert min(lengths) >= 1
