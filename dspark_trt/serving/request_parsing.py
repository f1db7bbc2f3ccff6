"""A served request's input tensors -> validated generation parameters, or an error naming the field.

Pure (no Triton import) so it is fuzzed without a server. Two Triton models use it:
`preprocessing` parses the ensemble's text inputs (`parse_text_request`) and `dspark_bls` the token
ids and sampling parameters (`parse_generation_request`). Every rejection is an `InvalidRequestError`
whose message starts with the client-facing field name (the ensemble's, e.g. `max_tokens` for
dspark_bls's `request_output_len`). Range checks on sampling parameters are SamplingParams' own, made when
one is built here; the engine does not check them again. Triton itself already refuses undeclared inputs and wrong dtypes/shapes for the
declared ones; the same checks here keep direct callers and the fuzz tests honest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from dspark_trt.engine.request import InvalidRequestError, SamplingParams
from dspark_trt.serving.ensemble import client_fields
from dspark_trt.serving.text import decode_word_list

Inputs = Mapping[str, "np.ndarray | None"]

# TensorRT-LLM inputs we accept for drop-in clients but do not implement: (neutral value, why only it passes)
BEAM_SEARCH = "beam search is not compatible with speculative decoding here (verification extends one sequence)"
NEUTRAL_OPTIONS = {
    "beam_width": (1, BEAM_SEARCH),
    "length_penalty": (1.0, f"it scores beams, and {BEAM_SEARCH}"),
    "return_context_logits": (False, "[prompt tokens, vocabulary] logits per request are too costly to return; "
                                     "return_log_probs gives each output token's log-probability"),
    "return_generation_logits": (False, "[output tokens, vocabulary] logits per request are too costly to "
                                        "return; return_log_probs gives each output token's log-probability"),
}
# dspark_bls input -> the ensemble field a client sent, where the names differ
CLIENT_NAMES = {name: field for name, field in client_fields("dspark_bls").items() if name != field}


@dataclass(frozen=True)
class TextRequest:
    """What preprocessing needs: the prompt text, stop and bad words, end/pad ids (-1 = the target's own)."""

    prompt: str
    stop_words: tuple[str, ...] = ()
    bad_words: tuple[str, ...] = ()
    end_id: int = -1
    pad_id: int = -1


@dataclass(frozen=True)
class Limits:
    """What the served engine can take."""

    vocab_size: int
    max_seq_len: int  # prompt + generated tokens
    eos_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    perf_metrics: bool = False


def parse_text_request(inputs: Inputs) -> TextRequest:
    """The ensemble's text fields (names as the client sends them: text_input, stop_words, ...)."""
    texts = _strings(inputs, "text_input")
    if texts is None:
        raise InvalidRequestError("text_input is missing: send the prompt as a one-element BYTES tensor")
    if len(texts) != 1:
        raise InvalidRequestError(f"text_input must hold one prompt per request, got {len(texts)}")
    if not texts[0]:
        raise InvalidRequestError("text_input is empty: send at least one character")
    for name, (neutral, reason) in NEUTRAL_OPTIONS.items():
        value = _scalar(inputs, name, type(neutral), neutral)
        if value != neutral:
            raise InvalidRequestError(f"{name}={value!r} is not supported by dspark-trt (only {neutral!r}): {reason}")
    return TextRequest(prompt=texts[0], stop_words=_words(inputs, "stop_words"), bad_words=_words(inputs, "bad_words"),
                       end_id=_scalar(inputs, "end_id", int, -1), pad_id=_scalar(inputs, "pad_id", int, -1))


def parse_generation_request(inputs: Inputs, limits: Limits,
                             decode: Callable[[list[int]], str] | None = None) -> GenerationRequest:
    """dspark_bls's inputs (input_ids, request_output_len, ...). `decode` turns multi-token stop
    words into stop strings; without it they are refused."""
    ids = _token_ids(inputs, limits)
    end_id = _scalar(inputs, "end_id", int, -1)
    if end_id != -1 and not 0 <= end_id < limits.vocab_size:
        raise InvalidRequestError(f"end_id must be -1 (the model's own) or in [0, {limits.vocab_size}), got {end_id}")
    stop_ids = limits.eos_ids if end_id == -1 else (end_id,)
    stop_strings: tuple[str, ...] = ()
    for word in _word_list(inputs, "stop_words_list", limits.vocab_size):
        if len(word) == 1:
            stop_ids += (word[0],)
        elif decode is None:
            raise InvalidRequestError("stop_words of several tokens need a tokenizer on this endpoint")
        else:
            stop_strings += (decode(word),)
    seed = _scalar(inputs, "seed", int, None)
    fields = dict(
        max_tokens=_scalar(inputs, "request_output_len", int, None),
        temperature=_scalar(inputs, "temperature", float, 0.0),
        top_k=_scalar(inputs, "runtime_top_k", int, 0),
        top_p=_scalar(inputs, "runtime_top_p", float, 1.0),
        seed=_scalar(inputs, "random_seed", int, 0) if seed is None else seed,
        stop_ids=stop_ids, stop_strings=stop_strings,
        repetition_penalty=_scalar(inputs, "repetition_penalty", float, 1.0),
        presence_penalty=_scalar(inputs, "presence_penalty", float, 0.0),
        frequency_penalty=_scalar(inputs, "frequency_penalty", float, 0.0),
        min_tokens=_scalar(inputs, "min_tokens", int, 0),
        bad_words=tuple(tuple(w) for w in _word_list(inputs, "bad_words_list", limits.vocab_size)),
        return_log_probs=_scalar(inputs, "return_log_probs", bool, False),
    )
    if fields["max_tokens"] is None:
        raise InvalidRequestError("max_tokens is missing: send how many tokens to generate")
    params = SamplingParams(**fields)
    limit = limits.max_seq_len - len(ids)
    if params.max_tokens > limit:
        raise InvalidRequestError(f"max_tokens {params.max_tokens} exceeds the limit {limit}")
    return GenerationRequest(prompt_ids=ids, params=params, stream=_scalar(inputs, "streaming", bool, False),
                             perf_metrics=_scalar(inputs, "return_perf_metrics", bool, False))


def parse_stop_request(inputs: Inputs) -> int | None:
    """The key of the request to stop when `stop` is true (TensorRT-LLM's stop input, addressed by the
    key dspark_bls tags its responses with); None for a generation request."""
    if not _scalar(inputs, "stop", bool, False):
        return None
    key = _scalar(inputs, "request_key", int, None)
    if key is None:
        raise InvalidRequestError("request_key is missing: a stop request names the request to stop")
    return key


# ---- tensors -> values -----------------------------------------------------------------------------------
def _label(name: str) -> str:
    return f"{CLIENT_NAMES[name]} ({name})" if name in CLIENT_NAMES else name


def _scalar(inputs: Inputs, name: str, kind: type, default):
    """The one value of an optional scalar input: int from an integer dtype, float from a real one,
    bool from BOOL; `default` when absent."""
    value = inputs.get(name)
    if value is None:
        return default
    array = np.asarray(value)
    if array.size != 1:
        raise InvalidRequestError(f"{_label(name)} must hold one value, got shape {list(array.shape)}")
    dtype = array.dtype
    ok = {bool: dtype == np.bool_,
          int: np.issubdtype(dtype, np.integer),
          float: np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)}[kind]
    if not ok:
        raise InvalidRequestError(f"{_label(name)} must be {kind.__name__}-typed, got dtype {dtype}")
    return kind(array.reshape(-1)[0].item())


def _strings(inputs: Inputs, name: str) -> list[str] | None:
    """The UTF-8 strings of a BYTES input (None when absent)."""
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype != np.object_ and array.dtype.kind not in "SU":
        raise InvalidRequestError(f"{name} must be a list of strings (BYTES), got dtype {array.dtype}")
    out = []
    for item in array.reshape(-1).tolist():
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, bytes):
            try:
                out.append(item.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        else:
            raise InvalidRequestError(f"{name} must be a list of strings, got an element of type {type(item).__name__}")
    return out


def _words(inputs: Inputs, name: str) -> tuple[str, ...]:
    """A stop/bad word list; empty strings mean none (TensorRT-LLM's convention)."""
    return tuple(w for w in _strings(inputs, name) or () if w)


def _token_ids(inputs: Inputs, limits: Limits) -> list[int]:
    value = inputs.get("input_ids")
    if value is None:
        raise InvalidRequestError("text_input is missing (dspark_bls input_ids)")
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidRequestError(f"{_label('input_ids')} must be integer token ids, got dtype {array.dtype}")
    if array.ndim > 1 and array.shape[0] != 1:
        raise InvalidRequestError(f"{_label('input_ids')} must hold one prompt, got shape {list(array.shape)}")
    ids = array.reshape(-1).tolist()
    if not ids:
        raise InvalidRequestError("text_input is empty: the prompt has no tokens")
    if min(ids) < 0 or max(ids) >= limits.vocab_size:
        bad = next(i for i in ids if not 0 <= i < limits.vocab_size)
        raise InvalidRequestError(f"{_label('input_ids')} holds token id {bad}, outside [0, {limits.vocab_size})")
    if len(ids) >= limits.max_seq_len:
        raise InvalidRequestError(f"text_input is too long: the prompt has {len(ids)} tokens, the context limit "
                                  f"is {limits.max_seq_len} (prompt + generated tokens)")
    return ids


def _word_list(inputs: Inputs, name: str, vocab_size: int) -> list[list[int]]:
    """TensorRT-LLM's [1, 2, L] (or [2, L]) word array as id lists, checked before it is trusted."""
    value = inputs.get(name)
    if value is None:
        return []
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.shape[0] != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidRequestError(f"{_label(name)} must be an integer [2, L] word array, got "
                                  f"{array.dtype} {list(array.shape)}")
    row = [int(o) for o in array[1]]
    offsets = row[: next((i for i, o in enumerate(row) if o < 0), len(row))]  # as decode_word_list reads it
    if offsets != sorted(set(offsets)) or (offsets and (offsets[0] < 1 or offsets[-1] > array.shape[1])):
        raise InvalidRequestError(f"{_label(name)} offsets {offsets} are not increasing ends within its "
                                  f"{array.shape[1]} ids")
    words = decode_word_list(array)
    if any(not 0 <= t < vocab_size for w in words for t in w):
        raise InvalidRequestError(f"{_label(name)} holds a token id outside [0, {vocab_size})")
    return words
