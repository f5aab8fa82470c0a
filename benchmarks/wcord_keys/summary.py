"""The table of benchmarks/wcord_keys/sweep.sh: python benchmarks/wcord_keys/summary.py [WORKDIR]."""
import json
import os
import sys

import numpy as np

TERMS = ("train/wcord_global", "train/emb_teacher_cos", "train/emb_student_cos", "train/emb_pos_cos")


def main(root: str) -> None:
    print("| design | seeds | test top-1 (%), mean ± std (each seed) | global term | teacher cos | student cos | pos cos |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(os.listdir(root)):
        runs = [os.path.join(root, name, s) for s in sorted(os.listdir(os.path.join(root, name)))
                if os.path.exists(os.path.join(root, name, s, "done"))] if os.path.isdir(os.path.join(root, name)) else []
        if not runs:
            continue
        top1, ends = [], {k: [] for k in TERMS}
        for run in runs:
            with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
                events = [json.loads(line) for line in f]
            top1.append(100 * [e["eval/top1"] for e in events if "eval/top1" in e][-1])
            for k in TERMS:  # the mean of the last three logged values (the last 60 steps)
                values = [e[k] for e in events if k in e]
                if values:
                    ends[k].append(np.mean(values[-3:]))
        std = np.std(top1, ddof=1) if len(top1) > 1 else 0.0
        cells = [f"{np.mean(v):.2f}" if v else "" for v in ends.values()]
        print(f"| {name} | {len(top1)} | {np.mean(top1):.2f} ± {std:.2f} ({', '.join(f'{t:.2f}' for t in top1)}) | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/wcord_keys")
