"""dspark_bls: decoupled orchestrator. `execute` turns each request into a Job; one engine thread
(dspark_trt.serving.orchestrator) runs every in-flight request, streams through its sender, and
reaches the target and the drafter by BLS calls to dspark_target / dspark_draft."""
import json

import triton_python_backend_utils as pb_utils

from dspark_trt.engine.engine import EngineOverloadedError
from dspark_trt.engine.factory import build_engine
from dspark_trt.errors import DSparkError
from dspark_trt.serving.bls_services import bls_call, single_threaded_torch
from dspark_trt.serving.orchestrator import Job, Orchestrator, describe, engine_options, served_limits
from dspark_trt.serving.request_parsing import parse_generation_request, parse_stop_request

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PREFIX = "dspark_"
ACCEPTED_LENGTH_BUCKETS = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16]


class Metrics:
    """Prometheus series on the metrics port, beside Triton's own nv_* ones (vLLM's names, our prefix)."""

    def __init__(self, block_size: int):
        def family(name, kind, description):
            return pb_utils.MetricFamily(name=PREFIX + name, description=description, kind=kind)

        counter, gauge, hist = (pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE,
                                pb_utils.MetricFamily.HISTOGRAM)
        self.families = {
            "requests": family("requests", counter, "requests finished, by outcome"),
            "tokens": family("generation_tokens", counter, "tokens generated"),
            "rounds": family("spec_decode_num_drafts", counter, "verification rounds"),
            "proposed": family("spec_decode_num_draft_tokens_proposed", counter, "draft tokens drafted"),
            "verified": family("spec_decode_num_draft_tokens", counter, "draft tokens sent to verification"),
            "accepted": family("spec_decode_num_accepted_tokens", counter, "draft tokens accepted"),
            "per_pos": family("spec_decode_num_accepted_tokens_per_pos", counter, "accepted drafts by block position"),
            "length": family("request_mean_accepted_length", hist, "mean accepted length per request (bonus included)"),
            "gate": family("draft_gate_steps", counter,
                           "decode steps by draft gate decision (draft: all requests, probe: one)"),
            "active": family("num_requests_running", gauge, "requests in the engine's slots"),
            "queue": family("num_requests_waiting", gauge, "requests waiting for a slot"),
        }
        f = self.families
        self.outcomes = {o: f["requests"].Metric(labels={"outcome": o}) for o in ("finished", "cancelled", "failed")}
        self.plain = {k: f[k].Metric(labels={}) for k in ("tokens", "rounds", "proposed", "verified", "accepted",
                                                           "active", "queue")}
        self.per_pos = [f["per_pos"].Metric(labels={"position": str(k)}) for k in range(block_size)]
        self.length = f["length"].Metric(labels={}, buckets=ACCEPTED_LENGTH_BUCKETS)
        self.gate = {d: f["gate"].Metric(labels={"decision": d}) for d in ("draft", "probe", "skip")}
        self._gate_seen = {d: 0 for d in self.gate}

    def finished(self, job: Job) -> None:
        request = job.request
        if request is None:
            self.outcomes["failed"].increment(1)
            return
        status = request.status.value
        self.outcomes[status if status in self.outcomes else "failed"].increment(1)
        stats = request.stats
        self.plain["tokens"].increment(len(request.output_ids))
        self.plain["rounds"].increment(len(stats.round_verified))
        self.plain["proposed"].increment(stats.draft_tokens_proposed)
        self.plain["verified"].increment(stats.draft_tokens_verified)
        self.plain["accepted"].increment(stats.draft_tokens_accepted)
        # each increment is a blocking round trip to tritonserver: one per position, not one per accepted draft
        per_pos = [sum(accepted > k for accepted in stats.round_accepted) for k in range(len(self.per_pos))]
        for metric, count in zip(self.per_pos, per_pos):
            if count:
                metric.increment(count)
        if stats.accepted_lengths:
            self.length.observe(stats.mean_accepted_length)

    def load(self, active: int, waiting: int) -> None:
        self.plain["active"].set(active)
        self.plain["queue"].set(waiting)

    def gate_decisions(self, decisions: dict[str, int]) -> None:
        """Bring the gate counters up to the engine's DraftGate.decisions (engine thread only)."""
        for decision, count in decisions.items():
            if count > self._gate_seen[decision]:
                self.gate[decision].increment(count - self._gate_seen[decision])
                self._gate_seen[decision] = count

    def close(self) -> None:
        """Metrics go before their families (the python backend's rule)."""
        self.outcomes = self.plain = self.per_pos = self.length = self.gate = None
        self.families = None


class TritonPythonModel:
    def initialize(self, args):
        single_threaded_torch()
        self.options = engine_options(json.loads(args["model_config"]))
        self.engine, self.tokenizer = build_engine(self.options, call=bls_call(pb_utils))
        runtime = self.engine.runtime
        pb_utils.Logger.log_info(f"dspark_bls: {describe(self.options)}; speculation "
                                 f"{'on, block size ' + str(runtime.block_size) if self.engine.speculate else 'off'}")
        self.limits = served_limits(self.engine)
        self.metrics = Metrics(runtime.block_size)
        self.orchestrator = Orchestrator(self.engine, self._respond, lambda job: job.sender.is_cancelled(),
                                         observe=self._observe)
        self.orchestrator.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                key = parse_stop_request(inputs)
                if key is not None:  # postprocessing saw this key's client cancel (serving/cancellation.py)
                    self.orchestrator.stop_request(key)
                    sender.send(flags=FINAL)
                    continue
                parsed = parse_generation_request(inputs, self.limits, decode=self.tokenizer.decode)
                self.orchestrator.submit(Job(prompt_ids=parsed.prompt_ids, params=parsed.params, stream=parsed.stream,
                                             perf_metrics=parsed.perf_metrics, sender=sender))
            except DSparkError as exc:  # InvalidRequestError names the field; EngineOverloadedError: queue full
                code = pb_utils.TritonError.UNAVAILABLE if isinstance(exc, EngineOverloadedError) \
                    else pb_utils.TritonError.INVALID_ARG
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), code)), flags=FINAL)
                self.metrics.outcomes["failed"].increment(1)
        self.metrics.load(self.orchestrator.active, self.orchestrator.queue_depth)
        return None

    def _respond(self, job, outputs, error, final):
        flags = FINAL if final else 0
        if error is not None:
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
        elif outputs is not None:
            response = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])
        else:  # cancelled: the flag alone closes the stream
            job.sender.send(flags=flags)
            return
        job.sender.send(response, flags=flags)

    def _observe(self, event, job):
        self.metrics.finished(job)
        self.metrics.load(self.orchestrator.active, self.orchestrator.queue_depth)
        if self.engine.draft_gate is not None:
            self.metrics.gate_decisions(self.engine.draft_gate.decisions)

    def finalize(self):
        self.orchestrator.stop()
        self.metrics.close()
