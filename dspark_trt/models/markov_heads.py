"""DSpark's sequential stage: low-rank previous-token biases B_k added to the parallel logits U_k.

All heads own W1 (token -> rank-r embedding, `markov_w1`, over the target vocabulary) and W2 (rank r ->
output vocabulary, `markov_w2`: the draft vocabulary when the drafter has a reduced one).
`step` computes B_k for one block position of R requests given the previous token, the backbone
hidden state h_k and (RNN only) the carried state; see DSPARK_SPEC.md section 2.
"""
from __future__ import annotations

import torch
from torch import nn

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


class MarkovHead(nn.Module):
    """Vanilla head: B_k = W2 · W1[x_{k-1}] (a rank-r first-order transition matrix)."""

    def __init__(self, vocab_size: int, out_size: int, hidden_size: int, rank: int):
        super().__init__()
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, out_size, bias=False)

    def initial_state(self, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def step(self, prev: torch.Tensor, hidden: torch.Tensor, state):
        """(bias [R, N], new state) for previous tokens [R] and hidden states [R, H]."""
        return self.markov_w2(self.markov_w1(prev)), state


class GatedMarkovHead(MarkovHead):
    """B_k = W2 · (σ(Wg [h_k ; W1[x_{k-1}]] + bg) ⊙ W1[x_{k-1}])."""

    def __init__(self, vocab_size: int, out_size: int, hidden_size: int, rank: int):
        super().__init__(vocab_size, out_size, hidden_size, rank)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)

    def step(self, prev, hidden, state):
        emb = self.markov_w1(prev)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, emb], dim=-1)))
        return self.markov_w2(gate * emb), state


class RNNMarkovHead(MarkovHead):
    """GRU-like: z = [s ; W1[x_{k-1}] ; h_k]; s' = g⊙s + (1-g)⊙tanh(c); B_k = W2 · tanh(o) (old state)."""

    def __init__(self, vocab_size: int, out_size: int, hidden_size: int, rank: int):
        super().__init__(vocab_size, out_size, hidden_size, rank)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def initial_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch, self.rank, dtype=like.dtype)

    def step(self, prev, hidden, state):
        z = torch.cat([state, self.markov_w1(prev), hidden], dim=-1)
        g_raw, c_raw, o_raw = self.joint_proj(z).chunk(3, dim=-1)
        g = torch.sigmoid(g_raw)
        new_state = g * state + (1 - g) * torch.tanh(c_raw)
        return self.markov_w2(torch.tanh(o_raw)), new_state


def make_markov_head(kind: str, vocab_size: int, out_size: int, hidden_size: int, rank: int) -> MarkovHead:
    heads = {"vanilla": MarkovHead, "gated": GatedMarkovHead, "rnn": RNNMarkovHead}
    return heads[kind](vocab_size, out_size, hidden_size, rank)


class ConfidenceHead(nn.Module):
    """s_k = w · [h_k ; W1[x_{k-1}]] + b (or w · h_k); c_k = σ(s_k) ≈ P(token k accepted | prefix accepted)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)
