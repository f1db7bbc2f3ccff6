"""Logit controls: repetition/presence/frequency penalties, min_tokens and bad words on the target's logits.

One semantics, TensorRT-LLM's (its executor SamplingConfig, the penalty kernel `batchApplyPenalty` and the
bad-word ban), used alike for a plain decoding step and for every row of a verification pass:

- seen tokens: the whole sequence before the position, prompt and generated tokens (TensorRT-LLM counts the
  context tokens too; its `prompt_ignore_length` defaults to 0 and is not exposed here). Under speculation
  the drafts before the row count as generated tokens (below).
- repetition_penalty θ > 0: a seen token's logit is divided by θ when positive, multiplied by θ when not
  (once, however often it was seen).
- presence_penalty α, frequency_penalty β (any finite value): a seen token's logit loses α + β · count.
  TensorRT-LLM subtracts them from the temperature-scaled logits, so they are subtracted here scaled by the
  temperature (1 for greedy): once `warp_probs` divides by T the distribution is TensorRT-LLM's.
- min_tokens m: the end ids (the request's stop ids) are masked while fewer than m tokens were generated.
- bad_words: a word w is masked at a position whose history ends with w[:-1] (a one-token word everywhere).
Masked means -inf: zero probability, never drawn, never the argmax.

Lossless under speculation: the row that verifies draft j is controlled with the history that includes
d_0 .. d_{j-1}. That is the history plain decoding has at that position when those drafts are the tokens
output, and it is the only case in which that row is used (after a rejection later rows are discarded). So
the verifier compares q with exactly the distribution plain decoding with the same controls draws from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dspark_trt.spec.sampling import is_greedy


@dataclass(frozen=True)
class LogitControls:
    """A request's controls (names as TensorRT-LLM's); the defaults change nothing."""

    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    end_ids: tuple[int, ...] = ()  # masked while fewer than min_tokens tokens were generated
    bad_words: tuple[tuple[int, ...], ...] = ()

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def active(self) -> bool:
        return self.penalizes or (self.min_tokens > 0 and bool(self.end_ids)) or bool(self.bad_words)


@dataclass(frozen=True)
class History:
    """A request at the position it predicts next: the tokens before it and how many of them it generated."""

    tokens: Sequence[int]  # prompt + generated tokens
    generated: int
    controls: LogitControls


def apply_controls(logits: torch.Tensor, row_offsets: torch.Tensor, draft_tokens: torch.Tensor,
                   histories: Sequence[History | None], temperature: torch.Tensor) -> torch.Tensor:
    """The controlled logits [N_rows, V] of a pass in DSparkVerify's layout (plugins/SCHEMA.md).

    Request r owns rows row_offsets[r] .. row_offsets[r+1]-1 and the drafts from row_offsets[r] - r on;
    histories[r] is its history at its first row (None: no controls), temperature[r] its temperature.
    Row j of a request is controlled with history.tokens + d_0 .. d_{j-1}. A plain decoding step is the
    one-row case (no drafts). Rows without controls are returned as they are; `logits` is not modified.
    """
    out = None
    for r, history in enumerate(histories):
        if history is None or not history.controls.active:
            continue
        if out is None:
            out = logits.float().clone()
        lo, hi = int(row_offsets[r]), int(row_offsets[r + 1])
        drafts = [int(t) for t in draft_tokens[lo - r: hi - 1 - r]]
        t = float(temperature[r])
        _controlled_rows(out[lo:hi], history, drafts, 1.0 if is_greedy(t) else t)
    return logits if out is None else out


def _controlled_rows(rows: torch.Tensor, history: History, drafts: list[int], scale: float) -> None:
    """Control rows [ℓ + 1, V] of one request in place, row j after history.tokens + drafts[:j]; scale: its
    temperature. Penalties touch only the columns of tokens some row has seen (at most the history's length)."""
    c = history.controls
    n = rows.shape[0]
    if c.penalizes:
        tokens = torch.as_tensor(list(history.tokens) + drafts, dtype=torch.long, device=rows.device)
        seen_tokens, column = torch.unique(tokens, return_inverse=True)  # column of each token among them
        counts = torch.bincount(column[: len(tokens) - len(drafts)], minlength=len(seen_tokens)).float()
        counts = counts.expand(n, -1)
        if drafts:  # row j + 1 and the rows after it have also seen draft j
            added = torch.zeros(counts.shape, device=rows.device)
            added[1:].scatter_(1, column[len(tokens) - len(drafts):].unsqueeze(1), 1.0)
            counts = counts + added.cumsum(0)
        seen = counts > 0
        # index_select/index_copy_: advanced indexing of a column set is ~1000x slower on a busy 2-core CPU
        logits = rows.index_select(1, seen_tokens)
        if c.repetition_penalty != 1.0:
            logits = torch.where(seen & (logits > 0), logits / c.repetition_penalty,
                                 torch.where(seen, logits * c.repetition_penalty, logits))
        rows.index_copy_(1, seen_tokens, logits - scale * (c.presence_penalty * seen + c.frequency_penalty * counts))
    unfinished = max(0, min(n, c.min_tokens - history.generated))  # rows whose token cannot end the request
    if unfinished and c.end_ids:
        rows[:unfinished].index_fill_(1, torch.tensor(c.end_ids, device=rows.device), float("-inf"))
    if c.bad_words:
        longest = max(len(w) for w in c.bad_words) - 1  # history needed to match a word's prefix
        context = list(history.tokens[max(0, len(history.tokens) - longest):] if longest else []) + drafts
        start = len(context) - len(drafts)
        for j in range(n):
            before = tuple(context[: start + j])
            for word in c.bad_words:
                prefix = word[:-1]
                if len(prefix) <= len(before) and before[len(before) - len(prefix):] == prefix:
                    rows[j, word[-1]] = float("-inf")
