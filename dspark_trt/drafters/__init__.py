"""Drafters shipped inside the package; `--draft default` loads `smollm2/` (see its README.md).

They are DeepSpec checkpoints stored in bfloat16 without embed_tokens/lm_head, which are the
target's (frozen copies, DSPARK_SPEC.md 1.6) and are taken from it at load time.
"""
