"""Write the prompts of the sequences `train-draft --validate-every` holds out of training, as a prompts file.

The shipped drafter's confidence head is calibrated on these (`dspark-trt calibrate --prompts`): the training
prompts cover every chat and code prompt of ../shared/data/prompts, so its held-out validation sequences are the
prompts of all three domains that the last training run never saw.

    python scripts/held_out_prompts.py data/drafter/smollm2-responses.jsonl.xz calib_prompts.jsonl
"""
from __future__ import annotations

import json
import sys

from dspark_trt.training.data import load_samples, response_lines, split_held_out


def held_out_prompts(responses: str) -> list[dict]:
    """{'turns': [prompt], 'domain': ...} for each held-out sequence, in the trainer's order."""
    rows = [json.loads(line) for line in response_lines(responses) if line.strip()]
    by_ids = {tuple(r["prompt_ids"] + r["response_ids"]): r for r in rows}
    held_out, _ = split_held_out(load_samples(responses))
    return [{"turns": [row["prompt"]], "domain": row["domain"]}
            for row in (by_ids[tuple(s.input_ids.tolist())] for s in held_out)]


if __name__ == "__main__":
    source, destination = sys.argv[1:3]
    with open(destination, "w") as out:
        out.writelines(json.dumps(p) + "\n" for p in held_out_prompts(source))
