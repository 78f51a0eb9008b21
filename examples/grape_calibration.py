"""Does sparse BP calibration lift GrAPE (and DFA) where the rule alone falls short of BP?

Runs BP / DFA / DFA + calibration / GrAPE / GrAPE + calibration on one model and dataset over
seeds, every run with the same init, data order and budget (``fastdfa.lab.train``), and records the
test accuracies with their mean, standard deviation and the paired gain of each calibrated rule
over its uncalibrated run of the same seed. Calibration variants (``--variants``):

    epoch      one exact-BP batch after every epoch       (--calibrate-every 1, the paper's form)
    steps25    every 25th step is exact BP instead        (--calibrate-every-steps 25)
    steps10    every 10th step is exact BP instead        (--calibrate-every-steps 10)
    ga0.2      one BP batch whenever the mean GA < 0.2    (--calibrate-below 0.2, checked every 50 steps)
    <any>-rule the same with --calibrate-scale rule: each BP gradient rescaled to the rule's norm

    python examples/grape_calibration.py --data fashion-mnist --train-samples 10000 \
        --hidden 256,256,256,256,256,256,256,256 --epochs 10 \
        --json bench/results/grape-calibration-fashion-mlp8-cpu.json
"""

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from fastdfa.grape import JVP  # noqa: E402
from fastdfa.info import machine_info  # noqa: E402
from fastdfa.lab.data import load_dataset, subsample_train  # noqa: E402
from fastdfa.lab.train import TrainConfig, train  # noqa: E402
from fastdfa.models import MODELS  # noqa: E402

CALIBRATIONS = {"epoch": dict(calibrate_every=1), "steps25": dict(calibrate_every_steps=25),
                "steps10": dict(calibrate_every_steps=10), "ga0.2": dict(calibrate_below=0.2)}
# "-rule": the same, each BP gradient rescaled to the norm of the rule's gradient (--calibrate-scale rule)
CALIBRATIONS.update({f"{k}-rule": dict(v, calibrate_scale="rule") for k, v in list(CALIBRATIONS.items())})


def rows_for(rules, variants):
    """(name, method, calibration kwargs, the uncalibrated row it is paired with)."""
    rows = [("bp", "bp", {}, None)]
    for rule in rules:
        rows.append((rule, rule, {}, None))
        rows += [(f"{rule} + {v}", rule, CALIBRATIONS[v], rule) for v in variants]
    return rows


def summarise(accs):
    return {"test_accuracy": accs, "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--model", default="mlp", choices=MODELS)
    parser.add_argument("--hidden", default="256,256,256,256,256,256,256,256")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--jvp", default="per-site", choices=JVP,
                        help="GrAPE's tangent pass (shared: one dual pass for all sites, as for a ResNet on a CPU)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rules", default="dfa,grape")
    parser.add_argument("--variants", default="epoch,steps10")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(CALIBRATIONS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(CALIBRATIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    data = load_dataset(args.data)
    if args.train_samples:
        data = subsample_train(data, args.train_samples)  # the seeded subset the CLI's --train-samples takes
    seeds = [int(s) for s in args.seeds.split(",")]
    base = TrainConfig(model=args.model, hidden=tuple(int(h) for h in args.hidden.split(",")),
                       activation=args.activation, epochs=args.epochs, jvp=args.jvp)
    results, runs = {}, {}
    for name, method, calibration, paired in rows_for(args.rules.split(","), variants):
        accs, steps_ms, bp_steps = [], [], []
        for seed in seeds:
            r = train(replace(base, method=method, seed=seed, **calibration), data, log=None)
            accs.append(r.test_accuracy)
            steps_ms.append(r.step_ms_median)
            bp_steps.append(len(r.calibrations))
            runs.setdefault(name, []).append({"seed": seed, "test_accuracy": r.test_accuracy,
                                              "per_epoch": [e.test_accuracy for e in r.epochs],
                                              "calibrations": r.calibrations, "step_ms_median": r.step_ms_median})
        row = summarise(accs) | {"bp_batches_per_run": bp_steps[0], "step_ms_median": statistics.median(steps_ms)}
        if paired is not None:
            gains = [a - b for a, b in zip(accs, results[paired]["test_accuracy"])]
            row["paired_gain"] = gains
            row["paired_gain_mean"] = statistics.fmean(gains)
        results[name] = row
        gain = f"   gain {row['paired_gain_mean']:+.4f} ({', '.join(f'{g:+.4f}' for g in row['paired_gain'])})" \
            if paired is not None else ""
        print(f"{name:<18} acc {row['mean']:.4f} ± {row['std']:.4f}   "
              f"({', '.join(f'{a:.4f}' for a in accs)}){gain}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": machine_info(), "command": "python examples/grape_calibration.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "data": data.name, "model": args.model, "hidden": base.hidden,
            "activation": args.activation, "epochs": args.epochs, "jvp": args.jvp, "seeds": seeds, "summary": results,
            "runs": runs}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
