"""LLaDA's two training objectives (arXiv 2502.09992, section 2 and GUIDELINES.md).

Pre-training: draw t ~ U(0, 1] per sequence (as p = (1 - eps) t + eps, so never
0), hide each token independently with probability p, and score the model's
cross-entropy on the hidden tokens only, each weighted by 1/p, summed and
divided by batch x length. That is an upper bound on the negative
log-likelihood, so the model it trains is a generative model, not only a
fill-in-the-blank one.

SFT: the same, but the prompt is never hidden; every response token (EOS
padding included, which is how the model learns where to stop) is a
candidate, and each sequence's loss is normalised by its response length.

Both functions take the random draws from an explicit generator (on the CPU,
whatever device the model is on), so a run is deterministic for a seed.
"""

import torch
import torch.nn.functional as F

EPS = 1e-3


def forward_process(ids, mask_id, gen, eps=EPS):
    """Hide tokens: returns (noisy ids, hidden bool mask, p per token)."""
    b, n = ids.shape
    t = torch.rand(b, generator=gen).to(ids.device)
    p = ((1 - eps) * t + eps)[:, None].expand(b, n)
    hidden = torch.rand((b, n), generator=gen).to(ids.device) < p
    return torch.where(hidden, torch.full_like(ids, mask_id), ids), hidden, p


def masked_ce(logits, ids, hidden, p):
    """Cross-entropy of each hidden token, divided by its masking probability."""
    ce = F.cross_entropy(logits[hidden].float(), ids[hidden], reduction="none")
    return ce / p[hidden]


def pretrain_loss(model, ids, mask_id, gen, eps=EPS):
    """The LLaDA pre-training loss of one batch [B, L]: sum over hidden tokens of
    CE/p, divided by B * L. Returns (loss, number of hidden tokens)."""
    noisy, hidden, p = forward_process(ids, mask_id, gen, eps)
    logits = model(noisy)
    loss = masked_ce(logits, ids, hidden, p).sum() / (ids.shape[0] * ids.shape[1])
    return loss, int(hidden.sum())


def random_length(ids, gen, prob=0.01):
    """LLaDA trains about 1% of the data at a random length in [1, L] so the model
    also sees short canvases; as in its code, the cut is per batch."""
    if torch.rand(1, generator=gen).item() < prob:
        n = int(torch.randint(1, ids.shape[1] + 1, (1,), generator=gen))
        return ids[:, :n]
    return ids


def sft_loss(model, ids, prompt_len, mask_id, gen, eps=EPS):
    """The LLaDA SFT loss of one batch: ids [B, L] (prompt, response, EOS padding),
    prompt_len [B]. Only response positions are hidden; each sequence's sum of
    CE/p is divided by its response length, then averaged over the batch."""
    b, n = ids.shape
    noisy, hidden, p = forward_process(ids, mask_id, gen, eps)
    is_prompt = torch.arange(n, device=ids.device)[None, :] < prompt_len[:, None]
    noisy = torch.where(is_prompt, ids, noisy)
    hidden = hidden & ~is_prompt
    answer_len = (n - prompt_len)[:, None].expand(b, n).float()
    logits = model(noisy)
    per_token = masked_ce(logits, ids, hidden, p) / answer_len[hidden]
    return per_token.sum() / b, int(hidden.sum())
