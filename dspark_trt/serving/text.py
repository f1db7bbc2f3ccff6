"""Text <-> token helpers shared by the preprocessing and postprocessing models.

Stop/bad word lists use TensorRT-LLM's layout so a drop-in client's words mean the same here: an
INT32 [2, L] array, row 0 every word's ids concatenated (padded with 0), row 1 each word's cumulative
end offset (padded with -1).

Streaming detokenisation is stateless on the postprocessing side: each response carries a window of
output ids and how many of them were already shown (`prefix_length`). The new text is the decode of
the window minus the decode of its prefix, so a multi-byte character split across tokens is held
back until it is complete, and a window start that cuts a character garbles both decodes alike.
"""
from __future__ import annotations

import numpy as np

from dspark_trt.errors import InvalidRequestError

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
DETOKENIZE_WINDOW = 6  # ids before the new ones re-decoded for context (spaces, merged bytes)


def encode_word_list(tokenizer, words: list[str], field: str) -> np.ndarray:
    """TensorRT-LLM's [2, L] stop/bad word array for words (empty words are dropped). A word that tokenizes
    to no token at all is refused, naming `field`: it could never match."""
    ids, offsets = [], []
    for word in words:
        if not word:
            continue
        word_ids = tokenizer.encode(word, add_special_tokens=False)
        if not word_ids:
            raise InvalidRequestError(f"{field} holds {word!r}, which the tokenizer turns into no token")
        ids.extend(word_ids)
        offsets.append(len(ids))
    width = max(1, len(ids)) if offsets else 0
    out = np.zeros((2, width), np.int32)
    out[1, :] = -1
    out[0, : len(ids)] = ids
    out[1, : len(offsets)] = offsets
    return out


def decode_word_list(array: np.ndarray) -> list[list[int]]:
    """The words (as id lists) of a [2, L] array; inverse of encode_word_list."""
    array = np.asarray(array).reshape(2, -1)
    words, start = [], 0
    for end in array[1]:
        if end < 0:
            break
        words.append([int(t) for t in array[0, start:end]])
        start = int(end)
    return words


def stream_window(output_ids: list[int], shown: int) -> tuple[list[int], int]:
    """(window of ids to send, how many of them were already shown) for ids after `shown`."""
    start = max(0, shown - DETOKENIZE_WINDOW)
    return output_ids[start:], shown - start


def new_text(tokenizer, window: list[int], prefix_length: int, final: bool) -> str:
    """Text of window[prefix_length:] in context; an incomplete trailing character waits unless final."""
    shown = tokenizer.decode(window[:prefix_length], skip_special_tokens=True).rstrip(REPLACEMENT) \
        if prefix_length else ""
    text = tokenizer.decode(window, skip_special_tokens=True)
    if not final:
        text = text.rstrip(REPLACEMENT)
    return text[len(shown):]
