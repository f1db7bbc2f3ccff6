"""Continuous-batching DSpark engine: admit, prefill, draft, schedule, verify, commit, stream.

Each step (1) admits waiting requests into free slots, (2) prefills prompts in chunks, (3) drafts a
block for every decoding request in one draft pass (or, with the draft gate, for one or none of them),
having first extended, in one call, the drafter's context of the requests whose target features not yet
given to the drafter have reached a backlog of `context_backlog` rows (a new prompt's, or skipped steps'),
(4) lets the scheduler pick each request's verification length from calibrated confidences, (5) verifies
all prefixes in one target pass with the DSparkVerify semantics, and (6) commits accepted tokens, rolls
back rejected K/V and streams the new tokens. So the drafter holds a request's context but its backlog,
which the next draft pass carries: while the draft gate declines, most steps make no drafter call at all
(at one row, an extension call's cost is mostly its fixed overhead). The engine knows nothing about the
backend: it talks to a `Runtime`.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Callable, Iterable

import torch

from dspark_trt.engine.request import Request, SamplingParams, Status, StreamCallback
from dspark_trt.errors import DSparkError
from dspark_trt.runtimes.base import Runtime
from dspark_trt.spec.calibration import apply_sts
from dspark_trt.spec.controls import History, apply_controls
from dspark_trt.spec.draft_gate import GatedScheduler
from dspark_trt.spec.sampling import is_greedy, sample_from_uniform, token_logprobs, uniforms, warp_probs
from dspark_trt.spec.scheduler import Scheduler


BACKLOG_BLOCKS = 4  # the default context_backlog, in verified blocks (with their bonus tokens)


class EngineOverloadedError(DSparkError):
    """The waiting queue is full; the request was refused rather than queued without bound."""


def _no_speculation(conf: torch.Tensor | None, max_lengths: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(max_lengths)


class Engine:
    """Runs many requests at once on one runtime. Not thread-safe: drive it from one thread."""

    def __init__(
        self,
        runtime: Runtime,
        scheduler: Scheduler | None = None,
        sts_temperatures: torch.Tensor | None = None,
        max_batch_tokens: int = 512,
        max_queue_size: int = 1024,
        detokenize: Callable[[list[int]], str] | None = None,
        record_rounds: bool = False,
        context_backlog: int | None = None,
    ):
        self.runtime = runtime
        self.scheduler = scheduler or _no_speculation
        self.speculate = scheduler is not None and runtime.block_size > 0
        self.draft_gate = scheduler.gate if isinstance(scheduler, GatedScheduler) else None
        self.sts_temperatures = sts_temperatures
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_size = max_queue_size
        self.detokenize = detokenize
        self.record_rounds = record_rounds  # keep per-round confidences (for calibration and eval)
        # rows of target features a request's drafter context may lag behind; by default four verified blocks
        # with their bonus tokens: an extension call costs mostly its fixed overhead (0.47 ms on the int4 CPU
        # engines for 8 rows), and carrying more rows in the next draft costs little
        self.context_backlog = (BACKLOG_BLOCKS * (runtime.block_size + 1) if context_backlog is None
                                else context_backlog)
        if self.context_backlog < 1:
            raise ValueError(f"context_backlog must be >= 1, got {context_backlog}")
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.steps = 0

    # ---- request lifecycle -------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    on_tokens: StreamCallback | None = None) -> Request:
        if not prompt_ids:
            raise DSparkError("prompt is empty: at least one token is needed")
        if len(prompt_ids) + 1 > self.runtime.max_seq_len:
            raise DSparkError(
                f"prompt has {len(prompt_ids)} tokens; the context limit is {self.runtime.max_seq_len}"
            )
        if len(self.waiting) >= self.max_queue_size:
            raise EngineOverloadedError(f"overloaded: {len(self.waiting)} requests already waiting")
        request = Request(
            request_id=request_id if request_id is not None else str(next(self._ids)),
            prompt_ids=list(prompt_ids), params=params, on_tokens=on_tokens, arrival_time=time.perf_counter(),
        )
        request.generator = torch.Generator().manual_seed(params.seed)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Ask for a request to stop; its slot is freed at the start of the next step."""
        request.cancel_requested = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        while self.has_work:
            self.step()

    def generate(self, prompts: Iterable[list[int]], params: SamplingParams) -> list[Request]:
        requests = [self.add_request(p, params) for p in prompts]
        self.run()
        return requests

    # ---- one engine step ---------------------------------------------------------------------
    def step(self) -> None:
        self.steps += 1
        self._drop_cancelled()
        self._admit()
        prefilling = [r for r in self.running if r.prefilled < len(r.prompt_ids)]
        if prefilling:
            self._guard(prefilling, self._prefill, prefilling)
        decoding = [r for r in self.running if r.anchor is not None and not r.done]
        max_lengths = self._max_lengths(decoding)  # nothing below changes them before the decode pass
        if decoding:
            self._guard(decoding, self._plan_drafts, decoding, max_lengths)
        # every request with a backlog, drafting or not: a draft carries less than a backlog, so the decode pass
        # the gate times never carries a prompt (a probe drafts for the stalest request, often one just prefilled)
        extending = [r for r in self.running if r.pending_rows >= self.context_backlog]
        if extending:
            self._guard(extending, self._extend_contexts, extending)
        live = [i for i, r in enumerate(decoding) if not r.done]
        if live:
            decoding = [decoding[i] for i in live]
            self._guard(decoding, self._decode, decoding, max_lengths[live])
        self.running = [r for r in self.running if not r.done]

    def _guard(self, requests: list[Request], fn, *args) -> None:
        """A failure inside a batched pass fails the requests of that pass, never the engine."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported to each request, engine keeps serving
            for request in requests:
                if not request.done:
                    self._finish(request, Status.FAILED, "error", error=f"{type(exc).__name__}: {exc}")

    def _drop_cancelled(self) -> None:
        for request in list(self.waiting):
            if request.cancel_requested:
                self.waiting.remove(request)
                self._finish(request, Status.CANCELLED, "cancelled")
        for request in self.running:
            if request.cancel_requested and not request.done:
                self._finish(request, Status.CANCELLED, "cancelled")
        self.running = [r for r in self.running if not r.done]

    def _admit(self) -> None:
        while self.waiting and self.runtime.free_slots > 0:
            request = self.waiting.popleft()
            request.slot = self.runtime.allocate_slot()
            request.status = Status.RUNNING
            self.running.append(request)

    def _prefill(self, requests: list[Request]) -> None:
        """Feed prompt chunks within the token budget; sample the first token of completed prompts."""
        budget = self.max_batch_tokens
        batch: list[tuple[Request, list[int]]] = []
        for request in requests:
            if budget <= 0:
                break
            chunk = request.prompt_ids[request.prefilled: request.prefilled + budget]
            batch.append((request, chunk))
            budget -= len(chunk)
        ids = torch.tensor([t for _, chunk in batch for t in chunk], dtype=torch.long)
        slots = torch.tensor([r.slot for r, _ in batch], dtype=torch.long)
        lens = torch.tensor([len(chunk) for _, chunk in batch], dtype=torch.long)
        out = self.runtime.target_forward(ids, slots, lens, logits_rows="last")
        row = 0
        for i, (request, chunk) in enumerate(batch):
            if self.speculate and out.taps is not None:
                request.pending_features.append(out.taps[row: row + len(chunk)])
            row += len(chunk)
            request.prefilled += len(chunk)
            if request.prefilled < len(request.prompt_ids):
                continue
            params = request.params
            raw, history = out.logits[i: i + 1], _history(request)
            logits = raw if history is None else apply_controls(
                raw, torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long), [history],
                torch.tensor([params.temperature]))
            probs = warp_probs(logits, params.temperature, params.top_k, params.top_p)
            token = int(sample_from_uniform(probs, uniforms(request.generator, 1))[0])
            request.stats.first_token_time = time.perf_counter()
            self._commit(request, [token], _logprobs(request, raw, [token]))

    def _extend_contexts(self, requests: list[Request]) -> None:
        """Give the drafter the backlog of requests that do not draft this step, in one call."""
        self.runtime.extend_context(torch.tensor([r.slot for r in requests], dtype=torch.long),
                                    [self._take_features(r) for r in requests])

    def _decode(self, requests: list[Request], max_lengths: torch.Tensor) -> None:
        """One decode step of `requests` (max_lengths: _max_lengths's); those whose last_draft_step is this step
        draft first. The draft gate is told the step's seconds from here on: a context extension before it is
        not the price of either choice (a new prompt's rows are extended whatever the gate decides, and the
        backlog's calls cost a few hundredths of a millisecond a step), and timing it made a prompt's first
        step look 2.5x a plain step, which kept the gate drafting for the next several."""
        started = time.perf_counter()
        rt = self.runtime
        n = len(requests)
        temperature = torch.tensor([r.params.temperature for r in requests], dtype=torch.float32)
        top_k = torch.tensor([r.params.top_k for r in requests], dtype=torch.long)
        top_p = torch.tensor([r.params.top_p for r in requests], dtype=torch.float32)
        slots = torch.tensor([r.slot for r in requests], dtype=torch.long)
        anchors = torch.tensor([r.anchor for r in requests], dtype=torch.long)

        draft, conf, row_of = None, None, {}
        lengths = torch.zeros(n, dtype=torch.long)
        drafting = [i for i, r in enumerate(requests) if r.last_draft_step == self.steps]
        if drafting:
            rows = torch.tensor(drafting)
            row_of = {i: row for row, i in enumerate(drafting)}  # request index -> its row in the draft
            draft_uniforms = torch.stack([uniforms(requests[i].generator, rt.block_size) for i in drafting])
            draft = rt.draft(slots[rows], [self._take_features(requests[i]) for i in drafting], anchors[rows],
                             temperature[rows], top_k[rows], top_p[rows], draft_uniforms)
            for i in drafting:
                requests[i].stats.draft_tokens_proposed += rt.block_size
            conf = self._calibrated(draft.confidence_logits)
            lengths = self._schedule(conf, rows, max_lengths)

        # one target pass over [anchor, d_0 .. d_{l-1}] of every request
        rows_per_request = lengths + 1
        row_offsets = torch.zeros(n + 1, dtype=torch.long)
        row_offsets[1:] = rows_per_request.cumsum(0)  # where each request's rows start in the pass
        pieces, draft_tokens, draft_probs = [], [], []
        vocab = rt.vocab_size
        # an all-greedy pass verifies without q: none is gathered (~0.2 MB a token), nor spelled out by the drafter
        q = None if draft is None or is_greedy(temperature).all() else draft.full_probs(vocab)
        for i, request in enumerate(requests):
            ell = int(lengths[i])
            pieces.append(anchors[i: i + 1])
            if ell:
                pieces.append(draft.tokens[row_of[i], :ell])
                draft_tokens.append(draft.tokens[row_of[i], :ell])
                if q is not None:
                    draft_probs.append(q[row_of[i], :ell])
        controlled = any(r.params.needs_logits for r in requests)  # else the pass runs as if controls did not exist
        out, result = rt.target_verify(
            torch.cat(pieces), slots, rows_per_request,
            torch.cat(draft_tokens) if draft_tokens else torch.zeros(0, dtype=torch.long),
            torch.cat(draft_probs) if draft_probs else torch.zeros(0, vocab),
            temperature, top_k, top_p,
            torch.cat([uniforms(r.generator, int(rows_per_request[i])) for i, r in enumerate(requests)]),
            controls=[_history(r) for r in requests] if controlled else None,
        )
        for i, request in enumerate(requests):
            try:
                if self.record_rounds and i in row_of and draft.confidence_logits is not None:
                    request.stats.round_confidence_logits.append(draft.confidence_logits[row_of[i]].tolist())
                self._commit_round(request, int(lengths[i]), int(result.accepted[i]), int(result.next_token[i]),
                                   draft, row_of.get(i), out, int(row_offsets[i]))
            except Exception as exc:  # noqa: BLE001 - one request's failure stays its own
                self._finish(request, Status.FAILED, "error", error=f"{type(exc).__name__}: {exc}")
        gate = self.draft_gate
        if gate is not None:
            seconds = time.perf_counter() - started
            if draft is None:
                gate.observe_plain(n, seconds)
            else:
                gate.observe_draft(conf, n, lengths[rows], torch.as_tensor(result.accepted)[rows], seconds)

    def _max_lengths(self, requests: list[Request]) -> torch.Tensor:
        """The most draft tokens each request may verify: block size, output budget, context limit."""
        rt = self.runtime
        return torch.tensor([max(0, min(rt.block_size, r.params.max_tokens - len(r.output_ids) - 1,
                                        rt.max_seq_len - r.context_length - 1))
                             for r in requests], dtype=torch.long)

    def _plan_drafts(self, requests: list[Request], max_lengths: torch.Tensor) -> None:
        """Mark (last_draft_step) the decoding requests that draft this step: all of them, none (the gate skips
        the pass), or the gate's probe, one request (the one longest without a draft), so that a probe costs a
        draft for one request rather than for all and sees every request in turn."""
        if not self.speculate:
            return
        plan = "draft" if self.draft_gate is None else self.draft_gate.plan(max_lengths)
        if plan == "skip":
            return
        drafting = requests
        if plan == "probe":
            candidates = [r for r, m in zip(requests, max_lengths.tolist()) if m > 0] or requests
            drafting = [min(candidates, key=lambda r: r.last_draft_step)]
        for request in drafting:
            request.last_draft_step = self.steps

    def _schedule(self, conf: torch.Tensor | None, rows: torch.Tensor, max_lengths: torch.Tensor) -> torch.Tensor:
        """ℓ of every request: the scheduler sees all of them (each one's anchor is in the target pass);
        the ones that did not draft have nothing to verify."""
        allowed = torch.zeros_like(max_lengths)
        allowed[rows] = max_lengths[rows]
        full = None
        if conf is not None:
            full = conf.new_zeros(len(max_lengths), conf.shape[1])
            full[rows] = conf
        return torch.minimum(self.scheduler(full, allowed).long(), allowed)

    def _commit_round(self, request: Request, ell: int, accepted: int, next_token: int, draft, row: int | None,
                      out, row0: int) -> None:
        """row: the request's row in this step's draft (None if it did not draft, so accepted is 0); out: the
        pass's TargetStep, whose rows row0 .. row0 + accepted gave the new tokens."""
        start = request.context_length
        new_ids = (draft.tokens[row, :accepted].tolist() if accepted else []) + [next_token]
        stats = request.stats
        stats.draft_tokens_verified += ell
        stats.draft_tokens_accepted += accepted
        stats.round_verified.append(ell)
        stats.round_accepted.append(accepted)
        # τ of the round: an accepted stop token ends it there, without the bonus/correction token
        stats.accepted_lengths.append(len(_cut_at_stop(new_ids, request.params.stop_ids)[0]))
        # the target cache keeps the anchor and the accepted drafts; the new anchor is not cached yet
        self.runtime.rollback(request.slot, start + accepted + 1)
        if self.speculate and out.taps is not None:
            request.pending_features.append(out.taps[row0: row0 + accepted + 1])
        self._commit(request, new_ids, _logprobs(request, out.logits[row0: row0 + accepted + 1], new_ids))

    def _commit(self, request: Request, new_ids: list[int], logprobs: list[float] | None = None) -> None:
        """Append tokens (and their log-probs, when kept), apply stop conditions and the token budget,
        stream, finish if done."""
        params = request.params
        new_ids, stopped = _cut_at_stop(new_ids, params.stop_ids)
        finish = "stop" if stopped else None
        room = params.max_tokens - len(request.output_ids)
        if len(new_ids) >= room:
            new_ids, finish = new_ids[:room], finish or "length"
        request.output_ids.extend(new_ids)
        if logprobs is not None:
            request.output_logprobs.extend(logprobs[: len(new_ids)])
        if (finish is None and params.stop_strings and len(request.output_ids) >= params.min_tokens
                and self._hit_stop_string(request)):
            finish = "stop"
        request.anchor = request.output_ids[-1]
        if finish is None:
            self._emit(request, new_ids, False)
        else:
            self._finish(request, Status.FINISHED, finish, new_ids=new_ids)

    def _hit_stop_string(self, request: Request) -> bool:
        if self.detokenize is None:
            raise DSparkError("stop strings need a tokenizer: construct the Engine with detokenize=...")
        longest = max(len(s) for s in request.params.stop_strings)
        tail = self.detokenize(request.output_ids[-(longest + 8):])
        return any(s in tail for s in request.params.stop_strings)

    def _finish(self, request: Request, status: Status, reason: str, new_ids: list[int] | None = None,
                error: str | None = None) -> None:
        request.status, request.finish_reason, request.error = status, reason, error
        request.finish_time = time.perf_counter()
        request.pending_features = []
        if request.slot is not None:
            self.runtime.free_slot(request.slot)
            request.slot = None
        self._emit(request, new_ids or [], True)

    def _emit(self, request: Request, new_ids: list[int], finished: bool) -> None:
        if request.on_tokens is not None:
            request.on_tokens(request, new_ids, finished)

    @staticmethod
    def _take_features(request: Request) -> torch.Tensor | None:
        """The target taps the drafter has not seen yet (None if there are none)."""
        pieces, request.pending_features = request.pending_features, []
        if not pieces:
            return None
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _calibrated(self, confidence_logits: torch.Tensor | None) -> torch.Tensor | None:
        """Calibrated conditional confidences c_k = sigmoid(s_k / T_k) (T_k from STS; 1 if uncalibrated)."""
        if confidence_logits is None:
            return None
        temps = self.sts_temperatures if self.sts_temperatures is not None else torch.ones(confidence_logits.shape[1])
        return apply_sts(confidence_logits.float(), temps)


def _history(request: Request) -> History | None:
    """The request's history at the position after its last token (None without controls)."""
    controls = request.params.controls
    if not controls.active:
        return None
    return History(tokens=request.prompt_ids + request.output_ids, generated=len(request.output_ids),
                   controls=controls)


def _logprobs(request: Request, raw_logits: torch.Tensor, new_ids: list[int]) -> list[float] | None:
    """Log-probs of new_ids under the raw target rows that gave them, when the request keeps them."""
    if not request.params.return_log_probs:
        return None
    return token_logprobs(raw_logits, torch.tensor(new_ids)).tolist()


def _cut_at_stop(ids: list[int], stop_ids: tuple[int, ...]) -> tuple[list[int], bool]:
    """ids up to and including the first stop id, and whether one was found."""
    for k, token in enumerate(ids):
        if token in stop_ids:
            return ids[: k + 1], True
    return ids, False
