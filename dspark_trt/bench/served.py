"""Served tokens/s through a real tritonserver (HTTP generate on the ensemble) vs the in-process
engine on the same engine directory, concurrency 1, interleaved per prompt; greedy outputs are
checked to be the same text."""
from __future__ import annotations

import json
import urllib.request

from dspark_trt.bench.common import environment, timed
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.graphs.manifest import load_engine_tokenizer
from dspark_trt.runtimes.ort_runtime import OrtRuntime
from dspark_trt.serving.default_pair import default_engines, default_repository
from dspark_trt.serving.package import ENTRY_MODEL
from dspark_trt.serving.tritonserver import TritonServer
from dspark_trt.spec.scheduler import make_scheduler


def bench_served(target: str, draft: str | None, prompts: list[str], max_tokens: int, cache_dir: str | None,
                 progress=lambda msg: None) -> dict:
    engines = default_engines(target, draft, cache_dir)
    repo = default_repository(target, draft, cache_dir, "fixed" if draft else "off")  # the in-process schedule
    tokenizer = load_engine_tokenizer(engines)
    runtime = OrtRuntime(engines, num_slots=1, use_drafter=draft is not None)
    scheduler = make_scheduler("fixed", runtime.block_size) if draft else None
    engine = Engine(runtime, scheduler)
    params = SamplingParams(max_tokens=max_tokens, stop_ids=tuple(runtime.eos_token_ids))
    with TritonServer(repo) as server:  # starts the server and waits until it is ready
        url = f"http://{server.http_url}/v2/models/{ENTRY_MODEL}/generate"

        def served(prompt: str) -> str:
            body = json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode()
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.loads(response.read())["text_output"]

        served(prompts[0])  # warm-up both paths
        engine.generate([chat_prompt_ids(tokenizer, prompts[0])], params)
        tokens, served_s, local_s, same = 0, 0.0, 0.0, True
        for i, prompt in enumerate(prompts):
            local, l_s = timed(lambda: engine.generate([chat_prompt_ids(tokenizer, prompt)], params)[0])
            text, s_s = timed(lambda: served(prompt))
            tokens += len(local.output_ids)
            local_s += l_s
            served_s += s_s
            same &= text == tokenizer.decode(local.output_ids, skip_special_tokens=True)
            progress(f"prompt {i + 1}/{len(prompts)}: in-process {len(local.output_ids) / l_s:.1f} tok/s, "
                     f"served {len(local.output_ids) / s_s:.1f} tok/s")
    return {"benchmark": "served", "target": target, "draft": draft, "prompts": len(prompts),
            "max_tokens": max_tokens, "tokens": tokens, "in_process_tokens_per_second": tokens / local_s,
            "served_tokens_per_second": tokens / served_s, "ratio": local_s / served_s, "same_text": same,
            "transport": "HTTP generate on the ensemble, concurrency 1", "environment": environment()}
