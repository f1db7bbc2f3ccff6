"""Self-distillation data: the target regenerates the responses, then gives tap features on the fly.

DSpark drafters learn the target's own distribution (DSPARK_SPEC.md 6.4), so the assistant turns
are the target's generations, not the datasets' answers. Regeneration runs through our Engine
(continuous batching) and appends each finished sample to a JSONL file keyed by a hash of the
prompt, so an interrupted run resumes where it stopped. FeatureExtractor runs one
target forward per batch of training sequences for the tapped layers' raw outputs (the drafter's
context) and the final-normed last hidden state (the teacher's logits through the frozen lm_head);
training/feature_cache.py keeps them on disk within a byte budget so later epochs skip the target.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from dspark_trt.devices import device_scope
from dspark_trt.engine.engine import Engine
from dspark_trt.engine.prompts import chat_prompt_ids
from dspark_trt.engine.request import SamplingParams
from dspark_trt.errors import DSparkError
from dspark_trt.models.target import TargetModel
from dspark_trt.runtimes.kv_cache import KVCache


VALIDATION_STRIDE, VALIDATION_MAX = 100, 64  # held-out sequences: every 100th, at most 64


@dataclass(frozen=True)
class Prompt:
    text: str
    domain: str = "chat"

    @property
    def key(self) -> str:
        return prompt_hash(self.text)


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def read_training_prompts(paths: Iterable[str | Path], limit_per_file: int | None = None) -> list[Prompt]:
    """First user turns of JSONL files ({"turns": [...], "domain": ...}), duplicates dropped."""
    prompts, seen = [], set()
    for path in map(Path, paths):
        if not path.is_file():
            raise DSparkError(f"prompts file not found: {path}")
        taken = 0
        for number, line in enumerate(path.read_text().split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = Prompt(str(row["turns"][0]), str(row.get("domain", "chat")))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise DSparkError(f"{path}:{number}: expected a JSON object with a non-empty 'turns' list") from exc
            if prompt.key in seen:
                continue
            seen.add(prompt.key)
            prompts.append(prompt)
            taken += 1
            if limit_per_file is not None and taken >= limit_per_file:
                break
    return prompts


def response_lines(path: str | Path) -> list[str]:
    """The lines of a responses file, plain or xz-compressed (`.xz`: a finished set as committed)."""
    path = Path(path)
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(path.read_bytes()).decode().split("\n")
    return path.read_text().split("\n")


def finished_keys(path: str | Path) -> set[str]:
    """Prompt hashes already in a responses file (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().split("\n"):
        try:
            keys.add(json.loads(line)["key"])
        except (ValueError, KeyError, TypeError):
            continue
    return keys


def regenerate_responses(runtime, tokenizer, prompts: list[Prompt], out_path: str | Path,
                         max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                         top_k: int = 0, seed: int = 0, sampled_share: float = 0.0,
                         sampled_temperature: float = 0.7, progress: bool = True) -> dict:
    """Generate the target's response to every prompt not yet in out_path, on `runtime` (any Runtime,
    its slots = the concurrency); returns {"added", "skipped_too_long", "tokens", "seconds", "tokens_per_second"}.

    Each finished sample is appended as one JSON line {key, domain, prompt, prompt_ids, response_ids,
    finish_reason, temperature} and flushed, so killing the run loses at most the samples in flight. A
    prompt is sampled at `sampled_temperature` (else decoded at `temperature`) when its hash falls in the
    `sampled_share`; its sampling seed derives from its hash too, so a resumed run draws what the first run
    would have, whatever the batch (the engines are batch-invariant).
    """
    out_path = Path(out_path)
    done = finished_keys(out_path)
    limit = runtime.max_seq_len - max_new_tokens - 1
    todo, too_long = [], 0
    for prompt in prompts:
        if prompt.key in done:
            continue
        ids = chat_prompt_ids(tokenizer, prompt.text)
        if len(ids) > limit:
            too_long += 1
            continue
        todo.append((prompt, ids))
    stats = {"added": 0, "skipped_too_long": too_long, "tokens": 0, "seconds": 0.0, "tokens_per_second": 0.0}
    if not todo:
        return stats
    out_path.parent.mkdir(parents=True, exist_ok=True)
    engine = Engine(runtime)
    stop_ids = tuple(runtime.eos_token_ids)
    queue, pending = list(reversed(todo)), []
    start = time.perf_counter()
    with out_path.open("a") as f:
        if f.tell() > 0 and not out_path.read_bytes().endswith(b"\n"):
            f.write("\n")  # end a torn line left by a killed run so the next record stays whole
        while queue or pending:
            while queue and len(engine.waiting) < runtime.num_slots:  # keep the slots fed, the queue short
                prompt, ids = queue.pop()
                sampled = int(prompt.key, 16) % 10_000 < sampled_share * 10_000
                params = SamplingParams(max_tokens=max_new_tokens,
                                        temperature=sampled_temperature if sampled else temperature, top_p=top_p,
                                        top_k=top_k, seed=(int(prompt.key, 16) + seed) % 2**63, stop_ids=stop_ids)
                pending.append((prompt, engine.add_request(ids, params)))
            engine.step()
            still = []
            for prompt, request in pending:
                if not request.done:
                    still.append((prompt, request))
                    continue
                if request.error:
                    raise DSparkError(f"generation failed for prompt {prompt.key}: {request.error}")
                f.write(json.dumps({"key": prompt.key, "domain": prompt.domain, "prompt": prompt.text,
                                    "prompt_ids": request.prompt_ids, "response_ids": request.output_ids,
                                    "finish_reason": request.finish_reason,
                                    "temperature": request.params.temperature}) + "\n")
                f.flush()
                stats["added"] += 1
                stats["tokens"] += len(request.output_ids)
                if progress and (stats["added"] % 25 == 0 or not (queue or still)):
                    elapsed = time.perf_counter() - start
                    left = (len(todo) - stats["added"]) * elapsed / stats["added"]  # at this session's pace
                    print(f"regenerate: {len(done) + stats['added']}/{len(done) + len(todo)} responses, "
                          f"{stats['tokens']} tokens, {stats['tokens'] / elapsed:.0f} generated tok/s, "
                          f"about {left / 3600:.1f} h left", file=sys.stderr)
            pending = still
    stats["seconds"] = time.perf_counter() - start
    stats["tokens_per_second"] = stats["tokens"] / stats["seconds"]
    return stats


@dataclass
class Sample:
    """One training sequence: chat-templated prompt + the target's response, loss on the response."""

    input_ids: torch.Tensor  # [T] long
    loss_mask: torch.Tensor  # [T] bool

    def __len__(self) -> int:
        return self.input_ids.numel()


def make_sample(prompt_ids: list[int], response_ids: list[int], max_length: int) -> Sample:
    """Tokens = chat template up to the assistant header ++ the target's own response tokens.

    The response is kept as the token ids the target generated (re-tokenising its decoded text can
    split differently); they end with the end-of-turn token when the target stopped, so the loss
    mask covers the assistant content through the end-of-turn marker as in spec 6.4.3.
    """
    ids = (list(prompt_ids) + list(response_ids))[:max_length]
    mask = ([False] * len(prompt_ids) + [True] * len(response_ids))[:max_length]
    return Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool))


def load_samples(path: str | Path, max_length: int = 2048, min_loss_tokens: int = 14) -> list[Sample]:
    """Samples of a responses file, truncated to max_length; too-short responses are dropped (spec 6.4.3)."""
    path = Path(path)
    if not path.is_file():
        raise DSparkError(f"responses file not found: {path}")
    samples = []
    for line in response_lines(path):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line from an interrupted run
        sample = make_sample(row["prompt_ids"], row["response_ids"], max_length)
        if int(sample.loss_mask.sum()) >= min_loss_tokens:
            samples.append(sample)
    return samples


def split_held_out(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(held out, training): every VALIDATION_STRIDE-th sample, at most VALIDATION_MAX, kept out of training. They
    are train-draft's validation sequences, and their prompts the shipped drafter's calibration prompts."""
    held_out = samples[::VALIDATION_STRIDE][:VALIDATION_MAX]
    training = [s for i, s in enumerate(samples) if i % VALIDATION_STRIDE or i // VALIDATION_STRIDE >= VALIDATION_MAX]
    return held_out, training


@dataclass
class TargetFeatures:
    """Target outputs for a packed batch of sequences (rows of all sequences concatenated)."""

    taps: torch.Tensor  # [M, len(tap_layers) * H] raw outputs of the tapped layers
    last_hidden: torch.Tensor  # [M, H] final-normed last-layer state (teacher logits = lm_head of it)
    target_lse: torch.Tensor  # [M] logsumexp of the teacher logits over the whole vocabulary
    positions: torch.Tensor  # [M] position within its sequence
    seq: torch.Tensor  # [M] index of the sequence in the batch


def feature_taps(config, tap_layers: list[int]) -> list[int]:
    """The layers a feature pass taps: the drafter's, then the last (the teacher's final hidden state)."""
    last = config.num_layers - 1
    if last in tap_layers:
        raise DSparkError(f"tap layer {last} is the target's last layer; the drafter must not tap it (spec 1.2)")
    return list(tap_layers) + [last]


class FeatureExtractor:
    """One target forward per batch of fresh sequences with taps at the drafter's layers (plus the last, for the
    teacher's final hidden state). precision "bf16" runs the forward
    under bfloat16 autocast, as the reference recipe's bf16 target cache (spec 6.4), the logsumexp in float32."""

    def __init__(self, target: TargetModel, tap_layers: list[int], max_batch: int, max_length: int,
                 precision: str = "fp32"):
        self.target = target
        self.precision = precision
        self.tap_layers = feature_taps(target.config, tap_layers)
        self.max_batch, self.max_length = max_batch, max_length
        weight = next(target.parameters())
        self.device = weight.device  # the features are made, and returned, where the weights are
        # the CPU attends per sequence in a reused KV cache (padding to the longest cost 8% of the forward there);
        # elsewhere one padded call per layer, since one call per sequence and layer bounded a GPU's step
        self.cache = (KVCache(target.config, num_slots=max_batch, max_seq_len=max_length, dtype=weight.dtype)
                      if self.device.type == "cpu" else None)

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> TargetFeatures:
        if len(samples) > self.max_batch:
            raise DSparkError(f"{len(samples)} sequences exceed the feature batch limit {self.max_batch}")
        lens = torch.tensor([len(s) for s in samples])
        if int(lens.max()) > self.max_length:
            raise DSparkError(f"a sequence of {int(lens.max())} tokens exceeds the feature length limit {self.max_length}")
        if self.cache is not None:
            self.cache.lengths.zero_()
        with device_scope(self.device), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                       enabled=self.precision == "bf16"):
            taps, last_hidden = self._forward(samples, lens)
        return TargetFeatures(
            taps=taps,
            last_hidden=last_hidden,
            # in float32 from the hidden state, as the trainer takes the teacher's logits from it
            target_lse=logsumexp_rows(self.target.lm_head, last_hidden),
            **packed_rows(lens, self.device),
        )

    def _forward(self, samples: list[Sample], lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(taps, final-normed last hidden state), float32."""
        out = self.target(torch.cat([s.input_ids for s in samples]).to(self.device),
                          torch.cat([torch.arange(n) for n in lens]), torch.arange(len(samples), device="cpu"), lens,
                          self.cache, tap_layers=self.tap_layers, logits_rows=torch.zeros(0, dtype=torch.long))
        h = self.target.config.hidden_size
        return out.taps[:, :-h].float(), self.target.norm(out.taps[:, -h:]).float()


def packed_rows(lens: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """positions and seq of TargetFeatures for sequences of lengths `lens`, on `device`."""
    lens = lens.cpu()
    return {"positions": torch.cat([torch.arange(int(n)) for n in lens]).to(device),
            "seq": torch.repeat_interleave(torch.arange(lens.numel()), lens).to(device)}


def logsumexp_rows(lm_head: torch.nn.Module, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """logsumexp over the vocabulary of lm_head(hidden) [M, V], in row chunks to bound memory."""
    return torch.cat([torch.logsumexp(lm_head(hidden[i: i + chunk]).float(), dim=-1)
                      for i in range(0, hidden.shape[0], chunk)])
