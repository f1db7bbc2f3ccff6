"""The verification tail every target graph flavour ends in: Gather(logits, verify_rows) -> DSparkVerify
(plugins/SCHEMA.md), its inputs, outputs and feeds (export/target_graph.py's add_verify_tail appends it).

It verifies the logits rows picked by `verify_rows`, grouped into requests by `row_offsets`, against the
draft tokens/probs with per-request sampling parameters and the given uniforms, and returns `accepted` and
`next_token` besides the graph's other outputs. A pass that verifies nothing feeds `no_verify_feeds` (zero
rows: the node costs nothing).
"""
from __future__ import annotations

import numpy as np
import torch

# graph inputs (besides the logits it verifies) and outputs, with their dims; "vocab" stands for the
# vocabulary size. Verify requests are logits-row groups, not query requests.
VERIFY_INPUTS = {"verify_rows": ["verify_rows"], "draft_tokens": ["drafts"], "draft_probs": ["drafts", "vocab"],
                 "row_offsets": ["verify_offsets"], "temperature": ["verify_requests"],
                 "top_k": ["verify_requests"], "top_p": ["verify_requests"], "uniforms": ["verify_rows"]}
VERIFY_OUTPUTS = {"accepted": ["verify_requests"], "next_token": ["verify_requests"]}
VERIFY_NODE = "dspark_verify"


def verify_feeds(verify_rows, draft_tokens, draft_probs, row_offsets, temperature, top_k, top_p,
                 uniforms) -> dict[str, np.ndarray]:
    """The verification tail's feeds (torch or numpy in; the dtypes the graph takes out).

    verify_rows: the logits rows (indices into this pass's logits output) to verify, request-major;
    the rest as DSparkVerify's inputs in plugins/SCHEMA.md.
    """
    def arr(x, dtype):
        return np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=dtype)

    return {"verify_rows": arr(verify_rows, np.int64), "draft_tokens": arr(draft_tokens, np.int64),
            "draft_probs": arr(draft_probs, np.float32), "row_offsets": arr(row_offsets, np.int64),
            "temperature": arr(temperature, np.float32), "top_k": arr(top_k, np.int64),
            "top_p": arr(top_p, np.float32), "uniforms": arr(uniforms, np.float32)}


def no_verify_feeds(vocab: int) -> dict[str, np.ndarray]:
    """Feeds for a pass that verifies nothing: zero rows, zero requests."""
    return verify_feeds(np.zeros(0), np.zeros(0), np.zeros((0, vocab)), np.zeros(1), np.zeros(0), np.zeros(0),
                        np.zeros(0), np.zeros(0))
