"""The Austen LM table from the runs of examples/lm_austen_grid.sh, and its summary record.

    python examples/lm_austen_table.py bench/results/lm-austen [--json bench/results/lm-austen-cpu.json]

Rows: method (+ calibration) x sites; columns: test perplexity on Persuasion (mean, std, seeds), bits per
character, median step time. The GrAPE paper's WikiText-103 Transformer row (perplexity BP 29.8, DFA 52.0,
GrAPE 42.3, DFA + calibration 42.7, GrAPE + calibration 33.1; DFA between blocks, BP inside them) is a
word-level model of another size on another corpus: it stands beside the table, not in it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

PAPER = {"bp": 29.8, "dfa": 52.0, "grape": 42.3, "dfa + calibration": 42.7, "grape + calibration": 33.1}


def group_runs(folder: str, key, extra: dict) -> dict:
    """The runs of ``folder`` (one JSON record each) grouped by ``key(run, path)``: per group the seeds, test
    perplexities, bits per character, files, and ``extra[name](run)`` for each extra column; with the
    perplexity's mean and (two seeds or more) standard deviation. The GPT-2 table (lm_gpt2_table.py) reads
    its runs with this too."""
    groups: dict = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        run = json.load(open(path))
        g = groups.setdefault(key(run, path), {"seeds": [], "test_perplexity": [], "bits_per_character": [],
                                               "files": [], **{name: [] for name in extra}})
        g["seeds"].append(run["config"]["seed"])
        g["test_perplexity"].append(run["test_perplexity"])
        g["bits_per_character"].append(run["bits_per_character"])
        g["files"].append(os.path.basename(path))
        for name, read in extra.items():
            g[name].append(read(run))
    for g in groups.values():
        ppl = g["test_perplexity"]
        g["mean"] = statistics.mean(ppl)
        g["std"] = statistics.stdev(ppl) if len(ppl) > 1 else None
    return groups


def rows(folder: str) -> dict:
    def key(run, path):
        cfg = run["config"]
        label = cfg["method"] + (" + calibration" if cfg.get("calibrate_every_steps") else "")
        return label, "-" if cfg["method"] == "bp" else cfg.get("sites", "blocks")
    return group_runs(folder, key, {"step_ms_median": lambda run: run.get("step_ms_median")})


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    groups = rows(args.folder)
    if not groups:
        print(f"no runs in {args.folder}", file=sys.stderr)
        return 1
    print("| rule | sites | test perplexity | bits/char | seeds | median step (ms) | paper (WikiText-103) |")
    print("|---|---|---|---|---|---|---|")
    for (label, sites), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "bp", kv[0])):
        std = f" ± {g['std']:.2f}" if g["std"] is not None else ""
        steps = [s for s in g["step_ms_median"] if s is not None]
        step = f"{statistics.median(steps):.0f}" if steps else "-"
        print(f"| {label} | {sites} | {g['mean']:.2f}{std} | {statistics.mean(g['bits_per_character']):.3f} | "
              f"{len(g['seeds'])} | {step} | {PAPER.get(label, '-')} |")
    if args.json:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from fastdfa.info import machine_info

        record = {"machine": machine_info(), "command": "bash examples/lm_austen_grid.sh; python "
                  "examples/lm_austen_table.py " + args.folder, "paper_wikitext103": PAPER,
                  "summary": {f"{label} / {sites}": g for (label, sites), g in groups.items()}}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
