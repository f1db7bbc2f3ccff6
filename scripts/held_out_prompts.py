"""Write the prompts of the sequences `train-draft --validate-every` holds out of training, as a prompts file.

The shipped drafter's confidence head is calibrated on these (`dspark-trt calibrate --prompts`): the training
prompts cover every chat and code prompt of ../shared/data/prompts, so its held-out validation sequences are the
prompts of all three domains that the last training run never saw.

    python scripts/held_out_prompts.py all11316.jsonl calib_prompts.jsonl
"""
from __future__ import annotations

import json
import sys

from dspark_trt.commands.train_draft import VALIDATION_MAX, VALIDATION_STRIDE
from dspark_trt.training.data import load_samples


def held_out_prompts(responses: str) -> list[dict]:
    """{'turns': [prompt], 'domain': ...} for each held-out sequence, in the trainer's order."""
    rows = [json.loads(line) for line in open(responses)]
    by_ids = {tuple(r["prompt_ids"] + r["response_ids"]): r for r in rows}
    held_out = load_samples(responses)[::VALIDATION_STRIDE][:VALIDATION_MAX]
    return [{"turns": [row["prompt"]], "domain": row["domain"]}
            for row in (by_ids[tuple(s.input_ids.tolist())] for s in held_out)]


if __name__ == "__main__":
    source, destination = sys.argv[1:3]
    with open(destination, "w") as out:
        out.writelines(json.dumps(p) + "\n" for p in held_out_prompts(source))
