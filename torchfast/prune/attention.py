"""A drop-in for ``nn.MultiheadAttention`` after whole heads (and/or its input/output width) were removed.

``nn.MultiheadAttention`` ties ``embed_dim`` to the query width and to ``num_heads * head_dim``
(``F.multi_head_attention_forward`` asserts it), so a head-pruned layer cannot stay an
``nn.MultiheadAttention``. This module keeps its call signature and return value
(``(output, weights or None)``, ``batch_first`` honoured) and runs ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrunedMultiheadAttention(nn.Module):
    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int, *, batch_first: bool = False,
                 dropout: float = 0.0, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.batch_first, self.dropout = num_heads, head_dim, batch_first, dropout
        self.embed_dim = inner
        self.q_proj = nn.Linear(in_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(in_dim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(in_dim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, out_dim, bias=bias, **kw)

    @staticmethod
    def _as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, S, H, d = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, L, H, d).transpose(1, 2)
        k = self.k_proj(key).view(B, S, H, d).transpose(1, 2)
        v = self.v_proj(value).view(B, S, H, d).transpose(1, 2)
        mask = self._as_additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (B*H, L, S) as nn.MultiheadAttention accepts
            mask = mask.view(B, -1, L, S)
        kpm = self._as_additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (d ** -0.5)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            attn = torch.softmax(scores, dim=-1)
            weights = attn.mean(1) if average_attn_weights else attn
            out = F.dropout(attn, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, H * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"
