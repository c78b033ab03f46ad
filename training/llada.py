"""The LLaDA transformer in PyTorch, for training.

The math is docs/LLADA.md line by line, and the module tree mirrors the
Hugging Face checkpoint, so `state_dict()` keys are the safetensors names
remask loads (`model.transformer.blocks.0.q_proj.weight`, ...):

    x = wte[ids]
    per block:  x += attn_out(Attn(rope(q_proj h), rope(k_proj h), v_proj h)),  h = attn_norm(x)
                x += ff_out(silu(ff_proj h) * up_proj h),                         h = ff_norm(x)
    logits = ff_out(ln_f(x))        # the output head; wte when weight_tying

Attention is bidirectional: there is no causal mask, every position sees the
whole canvas. No biases, no dropout, no logit scaling.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4
    n_layers: int = 6
    mlp_hidden_size: int = 704
    embedding_size: int = 4096
    vocab_size: int = 4096
    max_sequence_length: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    mask_token_id: int = 0
    eos_token_id: int = 0

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def to_hf(self, **extra):
        """config.json in the layout of GSAI-ML/LLaDA-8B (the fields remask reads and more)."""
        c = asdict(self)
        c.update(
            activation_type="silu", alibi=False, architectures=["LLaDAModelLM"],
            attention_dropout=0.0, block_type="llama", embedding_dropout=0.0,
            flash_attention=False, include_bias=False, include_qkv_bias=False, init_std=0.02,
            layer_norm_type="rms", mlp_ratio=4, model_type="llada", pad_token_id=self.eos_token_id,
            residual_dropout=0.0, rope=True, rope_full_precision=True, scale_logits=False,
            use_cache=False,
        )
        c.update(extra)
        return c


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        # Normalise in f32, cast back, THEN scale: LLaDA's order.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rope_tables(cfg, seq_len, device):
    """cos/sin of shape [T, head_dim], rotate-half layout, in f32."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    ang = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    xf = x.float() * cos + rotated.float() * sin
    return xf.to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin):
        cfg = self.cfg
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.n_kv_heads != cfg.n_heads:
            rep = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, T, cfg.d_model))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDA(nn.Module):
    """`LLaDA(cfg)(ids) -> logits [B, T, embedding_size]`."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        t = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
                blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
                ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            )
        )
        if not cfg.weight_tying:
            t["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        # `model.transformer.*`: the checkpoint's names.
        self.model = nn.Module()
        self.model.transformer = t

    def init_weights(self, seed):
        """GPT-2 style: N(0, 0.02), residual outputs scaled by 1/sqrt(2 n_layers)."""
        g = torch.Generator().manual_seed(seed)
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                nn.init.ones_(p)
            else:
                residual_out = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
                std = out_std if residual_out else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, ids):
        t = self.model.transformer
        x = t.wte(ids)
        cos, sin = rope_tables(self.cfg, ids.shape[1], ids.device)
        for block in t.blocks:
            x = block(x, cos, sin)
        x = t.ln_f(x)
        head = t.wte.weight if self.cfg.weight_tying else t.ff_out.weight
        return x @ head.t()
