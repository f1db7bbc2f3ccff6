"""Run prompts through an engine with per-round recording on (shared by `calibrate` and `eval`).

Both need the same thing: every verification round of every prompt, with the raw confidence logits,
reported as progress on stderr while it runs.
"""
from __future__ import annotations

import dataclasses
import sys

from dspark_trt.engine.engine import Engine
from dspark_trt.engine.request import Request, SamplingParams
from dspark_trt.errors import DSparkError


def run_rollouts(engine: Engine, prompts: list[list[int]], params: SamplingParams, label: str) -> list[Request]:
    """Decode every prompt (prompt i with seed params.seed + i, so sampled runs are reproducible).

    Prints `label: done/total prompts` on stderr whenever a prompt finishes; raises DSparkError if
    any request failed.
    """
    engine.record_rounds = True
    requests = [engine.add_request(ids, dataclasses.replace(params, seed=params.seed + i))
                for i, ids in enumerate(prompts)]
    done = 0
    while engine.has_work:
        engine.step()
        finished = sum(r.done for r in requests)
        if finished != done:
            done = finished
            print(f"{label}: {done}/{len(requests)} prompts", file=sys.stderr, flush=True)
    failed = [r for r in requests if r.error]
    if failed:
        raise DSparkError(f"{label}: {len(failed)} request(s) failed, first: {failed[0].error}")
    return requests
