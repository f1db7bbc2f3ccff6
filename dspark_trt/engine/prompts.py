"""Prompts as the reference evaluates them: the target's chat template over one user message."""
from __future__ import annotations

import json
from pathlib import Path

from dspark_trt.errors import DSparkError


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of the chat-templated prompt (one user turn, generation prompt appended)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def chat_prompt_text(tokenizer, text: str) -> str:
    """The chat-templated prompt as text (what a server that templates nothing itself is sent)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def read_prompts_file(path: str | Path, limit: int | None = None) -> list[str]:
    """First user turns of a JSONL file whose lines are {"turns": [str, ...]} (the eval-set format)."""
    path = Path(path)
    if not path.is_file():
        raise DSparkError(f"prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text().split("\n"), 1):
        if not line.strip():
            continue
        try:
            turns = json.loads(line)["turns"]
            prompts.append(str(turns[0]))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise DSparkError(f"{path}:{number}: expected a JSON object with a non-empty 'turns' list") from exc
        if limit is not None and len(prompts) >= limit:
            break
    return prompts
