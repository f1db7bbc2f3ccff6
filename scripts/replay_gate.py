"""Replay recorded verification rounds under the draft gate and the verification rules, at batch 1, on a cost table.

Why: whether the gate drafts when it should is a question about decisions, not about timing, and a benchmark
answers it slowly and noisily. This records once, on engines, every round of a fixed-γ run (each round's raw
confidence logits and the drafts the target accepted), then prices every policy on the cost table: fixed γ, the
`dspark` rule drafting every step, the `dspark` rule behind the package's DraftGate, and a per-round oracle.
A round of the recording stands for the step at which the policy meets it; a policy that verifies ℓ drafts
commits 1 + min(accepted, ℓ) tokens, which holds because the drafts do not depend on ℓ.

    python scripts/replay_gate.py record ENGINES PROMPTS.jsonl rounds.pt
    python scripts/replay_gate.py replay rounds.pt COST_TABLE.json CALIBRATION.json [--domain math]
"""
from __future__ import annotations

import argparse
import json

import torch

from dspark_trt.spec.calibration import apply_sts, load_calibration
from dspark_trt.spec.cost_table import CostTable
from dspark_trt.spec.draft_gate import DraftGate
from dspark_trt.spec.scheduler import schedule_dspark


def record(engines: str, prompts_file: str, out: str, max_tokens: int) -> None:
    from dspark_trt.engine.factory import EngineOptions, build_engine
    from dspark_trt.engine.prompts import chat_prompt_ids
    from dspark_trt.engine.request import SamplingParams
    from dspark_trt.engine.rollouts import run_rollouts
    from dspark_trt.spec.eval_stats import rounds_from_requests

    engine, tokenizer = build_engine(EngineOptions(engines=engines, schedule="fixed", num_slots=8))
    prompts = [json.loads(line) for line in open(prompts_file)]
    params = SamplingParams(max_tokens=max_tokens, stop_ids=tuple(engine.runtime.eos_token_ids))
    requests = run_rollouts(engine, [chat_prompt_ids(tokenizer, p["turns"][0]) for p in prompts], params, "record")
    per_prompt = []
    for prompt, request in zip(prompts, requests):
        rounds = rounds_from_requests([request], engine.runtime.block_size)
        per_prompt.append({"domain": prompt.get("domain"), "logits": rounds.confidence_logits,
                           "accepted": rounds.accepted})
    torch.save(per_prompt, out)
    print(f"{sum(len(p['accepted']) for p in per_prompt)} rounds of {len(per_prompt)} prompts -> {out}")


def replay(rounds_file: str, table_file: str, calibration_file: str, domain: str | None) -> dict:
    table = CostTable.from_json(table_file)
    temps = torch.tensor(load_calibration(calibration_file).temperatures)
    rounds = [(apply_sts(p["logits"][i:i + 1], temps), int(p["accepted"][i]))
              for p in torch.load(rounds_file, weights_only=False) if domain in (None, p["domain"])
              for i in range(len(p["accepted"]))]
    gamma = rounds[0][0].shape[1]
    room = torch.tensor([gamma])
    draft = table.draft_step_seconds(1)

    def seconds(verified: int) -> float:
        return 1.0 / float(table.sps(1 + verified, 1))

    def speedup(lengths: list[int], drafted: list[bool]) -> float:
        tokens = sum(1 + min(accepted, ell) for (_, accepted), ell in zip(rounds, lengths))
        spent = sum(seconds(ell) + draft * did for ell, did in zip(lengths, drafted))
        return tokens / spent * seconds(0)

    every = [True] * len(rounds)
    result = {f"fixed γ={g}": speedup([g] * len(rounds), every) for g in range(1, gamma + 1)}
    result["dspark, drafting every step"] = speedup([int(schedule_dspark(c, table, room)[0]) for c, _ in rounds], every)
    gate, lengths, drafted = DraftGate(table), [], []
    for conf, accepted in rounds:
        if gate.plan(room) == "skip":
            lengths.append(0), drafted.append(False)
            gate.observe_plain(1, seconds(0))
            continue
        ell = int(schedule_dspark(conf, table, room)[0])
        lengths.append(ell), drafted.append(True)
        gate.observe_draft(conf, 1, torch.tensor([ell]), torch.tensor([min(accepted, ell)]), seconds(ell) + draft)
    result["dspark behind the draft gate"] = speedup(lengths, drafted)
    result["gate decisions"] = dict(gate.decisions)
    oracle = [max(range(gamma + 1), key=lambda ell: (1 + min(a, ell)) / (seconds(ell) + draft)) for _, a in rounds]
    result["per-round oracle, drafting every step"] = speedup(oracle, every)
    return {"rounds": len(rounds), "domain": domain or "all", **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("engines")
    rec.add_argument("prompts")
    rec.add_argument("out")
    rec.add_argument("--max-tokens", type=int, default=128)
    rep = sub.add_parser("replay")
    rep.add_argument("rounds")
    rep.add_argument("cost_table")
    rep.add_argument("calibration")
    rep.add_argument("--domain")
    args = parser.parse_args()
    if args.command == "record":
        record(args.engines, args.prompts, args.out, args.max_tokens)
    else:
        print(json.dumps(replay(args.rounds, args.cost_table, args.calibration, args.domain), indent=1))


if __name__ == "__main__":
    main()
