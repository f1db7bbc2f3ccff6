"""Choosing a reduced draft vocabulary: the N target tokens the target itself emits most (EAGLE-3, FR-Spec).

Tokens are ranked by their count in the target's responses; ties, including the many tokens never seen, go
to the lower id, because a BPE tokenizer numbers its merges in the order it learned them, most frequent
first, so id order is a corpus-frequency prior for what the responses are too few to rank.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from dspark_trt.training.data import response_lines

COVERAGE_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)


def count_response_tokens(responses: str | Path, folds: int = 1) -> list[Counter]:
    """Token counts of the responses in a responses.jsonl, one Counter per fold (row i in fold i % folds)."""
    counts = [Counter() for _ in range(folds)]
    for i, line in enumerate(response_lines(responses)):
        try:
            counts[i % folds].update(json.loads(line)["response_ids"])
        except ValueError:
            continue  # a torn last line from an interrupted run
    return counts


def rank_tokens(counts: Counter, vocab_size: int) -> torch.Tensor:
    """All target ids, most frequent first; ties (and unseen tokens) by ascending id."""
    freq = torch.zeros(vocab_size, dtype=torch.long)
    for token, n in counts.items():
        freq[token] = n
    return torch.argsort(-freq, stable=True)


def select_draft_vocab(counts: Counter, vocab_size: int, size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The draft vocabulary: `size` ascending target ids, the most frequent plus `always` (e.g. end of turn)."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"a draft vocabulary of {size} tokens does not fit a vocabulary of {vocab_size}")
    ranked = [t for t in rank_tokens(counts, vocab_size).tolist() if t not in set(always)]
    ids = list(dict.fromkeys(always))[:size]
    ids += ranked[: size - len(ids)]
    return torch.tensor(sorted(ids), dtype=torch.long)


def coverage_table(fit: Counter, held_out: Counter, vocab_size: int,
                   sizes=COVERAGE_SIZES) -> dict[int, float]:
    """N -> share of the held-out response tokens inside the top-N vocabulary ranked on `fit`."""
    total = sum(held_out.values())
    ranked = rank_tokens(fit, vocab_size)
    table = {}
    for size in sizes:
        if size > vocab_size:
            continue
        inside = torch.zeros(vocab_size, dtype=torch.bool)
        inside[ranked[:size]] = True
        table[size] = sum(n for t, n in held_out.items() if inside[t]) / max(1, total)
    return table
