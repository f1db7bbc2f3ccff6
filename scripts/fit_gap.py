"""Is the drafter short of data or of capacity? Teacher-forced τ on responses it trained on against responses of
the same domain it never saw (the gen-data set grew after it was trained: its first SEEN lines are its training
set). A large gap says more distinct data would pay; none says the drafter (or its training) is the limit.

    python scripts/fit_gap.py --seen 4918 --per-set 32 --out docs/bench/train/fit_gap.json
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile

from dspark_trt.bench.common import environment
from dspark_trt.models.drafter_checkpoint import load_drafter
from dspark_trt.models.weights import load_target
from dspark_trt.training.data import FeatureExtractor, make_sample, response_lines
from dspark_trt.training.trainer import Trainer, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", default="data/drafter/smollm2-responses.jsonl.xz")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--seen", type=int, required=True, help="the first SEEN lines are the drafter's training set")
    parser.add_argument("--per-set", type=int, default=32, help="responses drawn from each side, per domain")
    parser.add_argument("--domains", nargs="+", default=["math", "chat", "code"])
    parser.add_argument("--num-anchors", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()

    target, _ = load_target("smollm2")
    drafter = load_drafter(args.draft, target=target).eval()
    extractor = FeatureExtractor(target, drafter.config.target_layer_ids, max_batch=4, max_length=1024)
    rows: dict[tuple[str, bool], list] = {}
    for index, line in enumerate(response_lines(args.responses)):
        if not line:
            continue  # the file's last newline
        row = json.loads(line)
        rows.setdefault((row.get("domain", "?"), index < args.seen), []).append(row)
    results = []
    for domain in args.domains:
        for seen in (True, False):
            pool = rows.get((domain, seen), [])
            picked = random.Random(f"{domain}:{seen}").sample(pool, min(args.per_set, len(pool)))
            samples = [make_sample(r["prompt_ids"], r["response_ids"], 1024) for r in picked]
            samples = [s for s in samples if int(s.loss_mask.sum()) >= 14]
            if not samples:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer(drafter, extractor, samples, TrainConfig(batch_size=4, num_anchors=args.num_anchors),
                                  tmp, held_out=samples)
                tau = trainer.validate()
            results.append({"domain": domain, "seen": seen, "responses": len(samples), "teacher_forced_tau": tau})
            print(f"{domain:5s} {'seen' if seen else 'unseen':6s} {len(samples):3d} responses  τ {tau:.3f}", flush=True)
    report = {"command": "scripts/fit_gap.py", "args": vars(args), "results": results, "environment": environment()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
