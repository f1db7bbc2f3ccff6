"""A generation request as the engine sees it: what was asked, where it is, what it has cost."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from dspark_trt.errors import InvalidRequestError

if TYPE_CHECKING:  # torch only types fields here: preprocessing parses requests without importing it
    import torch

    from dspark_trt.spec.controls import LogitControls


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (names follow TensorRT-LLM's Triton backend)."""

    max_tokens: int = 128
    temperature: float = 0.0  # greedy below spec.sampling.GREEDY_TEMPERATURE (is_greedy)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    # logit controls (spec/controls.py): they change the distribution tokens are drawn from
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # no stop id or stop string ends the request before this many tokens
    bad_words: tuple[tuple[int, ...], ...] = ()
    return_log_probs: bool = False  # keep each output token's log-probability (spec.sampling.token_logprobs)

    @property
    def controls(self) -> LogitControls:
        from dspark_trt.spec.controls import LogitControls

        return LogitControls(repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                             frequency_penalty=self.frequency_penalty, min_tokens=self.min_tokens,
                             end_ids=self.stop_ids, bad_words=self.bad_words)

    @property
    def needs_logits(self) -> bool:
        """Whether its verification needs the target's logits on the host (controls or log-probs)."""
        return self.return_log_probs or self.controls.active

    def __post_init__(self) -> None:
        """Every SamplingParams is valid: a request is checked once, where it is parsed into one (the served
        request parser, the CLI's arguments), not again by the engine."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 <= self.seed < 2**64:
            raise InvalidRequestError(f"seed must be in [0, 2^64), got {self.seed!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                                      f"got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be a finite number (0 = off), got {getattr(self, name)!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be an integer in [0, max_tokens = {self.max_tokens}], "
                                      f"got {self.min_tokens!r}")
        if any(not word or min(word) < 0 for word in self.bad_words):
            raise InvalidRequestError(f"bad_words must be non-empty lists of token ids, got {self.bad_words!r}")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass
class RequestStats:
    """Speculation counters of one request (τ per round includes the bonus/correction token)."""

    accepted_lengths: list[int] = field(default_factory=list)
    draft_tokens_proposed: int = 0  # drafted by the drafter (block size per round)
    draft_tokens_verified: int = 0  # sent to the target for verification
    draft_tokens_accepted: int = 0
    first_token_time: float | None = None
    round_verified: list[int] = field(default_factory=list)  # ℓ per round
    round_accepted: list[int] = field(default_factory=list)  # accepted drafts per round
    round_confidence_logits: list[list[float]] = field(default_factory=list)  # when the engine records them

    @property
    def mean_accepted_length(self) -> float:
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 1.0


# Called with (request, new token ids, finished) for every committed chunk.
StreamCallback = Callable[["Request", list[int], bool], None]


@dataclass
class Request:
    """Engine-side state of one request. The engine owns it; callers read it after it finishes."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_tokens: StreamCallback | None = None
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)  # one per output id when params.return_log_probs
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    arrival_time: float = 0.0
    finish_time: float | None = None
    # engine state
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the target cache
    anchor: int | None = None  # last committed token, whose target K/V is not cached yet
    last_draft_step: int = -1  # the engine step of its last draft (the gate's probe takes the stalest)
    # the target taps the drafter has not seen yet (its backlog), a piece per pass, joined when taken: the next
    # draft pass takes them, or a context extension (Runtime.extend_context) once they reach the engine's
    # context_backlog rows
    pending_features: list[torch.Tensor] = field(default_factory=list)
    generator: torch.Generator | None = None
    cancel_requested: bool = False

    @property
    def pending_rows(self) -> int:
        return sum(len(piece) for piece in self.pending_features)

    @property
    def done(self) -> bool:
        return self.status in (Status.FINISHED, Status.CANCELLED, Status.FAILED)

    @property
    def context_length(self) -> int:
        """Position of the anchor = tokens whose target K/V are cached."""
        return len(self.prompt_ids) + len(self.output_ids) - 1
