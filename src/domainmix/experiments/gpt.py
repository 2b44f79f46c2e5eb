"""A tiny GPT (nanoGPT-sized, CPU-trainable) whose loss is per token, for the language-model experiments.

Pre-norm transformer blocks with causal self-attention (``F.scaled_dot_product_attention``), learned
positions, and an output layer tied to the token embedding. ``per_token_loss`` returns the (B, T) cross
entropy so that :func:`~domainmix.losses.domain_losses` and :func:`~domainmix.losses.weighted_loss` can
reduce it by domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model."""

    vocab_size: int = 256
    """Token ids in [0, vocab_size); 256 for bytes."""
    block_size: int = 128
    """Context length T."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads (n_embd must be divisible by it)."""
    n_embd: int = 128
    """Width d."""
    dropout: float = 0.0
    """Dropout on attention and residual branches."""

    def __post_init__(self) -> None:
        problems = [
            f"'{name}' must be an int >= 1. Got {getattr(self, name)!r} instead."
            for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if not problems and self.n_embd % self.n_head:
            problems.append(f"'n_embd' ({self.n_embd}) must be divisible by 'n_head' ({self.n_head}).")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"'dropout' must be in [0, 1). Got {self.dropout!r} instead.")
        if problems:
            raise ValueError("GPTConfig: " + " ".join(problems))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer: ``model(idx)`` -> logits (B, T, V)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied: the one matrix DoGE's parameter subset must skip
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2's scaled init of residual projections keeps the residual stream's variance flat.
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied matrix counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor) -> Tensor:
        """Logits for every position of ``idx`` (B, T ≤ block_size)."""
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.cfg.block_size}.")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def untied_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters other than the tied embedding (a DoGE subset must leave that one out)."""
        tied = {id(self.tok.weight)}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in tied]


def per_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T) cross entropy of next-token logits (B, T, V) against targets (B, T)."""
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t), reduction="none").view(b, t)
