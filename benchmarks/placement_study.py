"""The paper's Table 1 on a laptop: which side each asymmetric design belongs on, in CPU minutes.

For one script (default mocov2_asym.py) at its docstring's CPU example (the built-in synthetic
shapes, ResNet-18 at 32 px), trains the baseline and each design placed on the source, the target
or both, for several seeds, and prints the paper's Table 1 form: per row the kNN top-1 (mean and
spread over the seeds), the difference to the baseline, the paper's ImageNet figure beside it,
and the variance monitor's v_source and v_target at the end; then, per design, whether the
source/target ordering agrees with the paper's beyond the seed noise; then, over every run, the
Spearman correlation of log(v_target / v_source) with the kNN top-1 (the paper's claim predicts
it negative), with a permutation p-value and a bootstrap interval, over all runs, then over the
placements of the designs on each side (row means). Rows stream as they finish;
results.jsonl, table.md and placement.png (with matplotlib) go to --output-dir. An interrupted
study continues where it stopped: finished runs are read back from results.jsonl, a run cut short
continues from its own checkpoint (the scripts resume); a finished one just prints its tables.

Examples:
    python benchmarks/placement_study.py --quick     # ScaleMix and WeakerAug, one seed
    python benchmarks/placement_study.py --seeds 0 1 2 --sides source target both
    python benchmarks/placement_study.py --script simsiam_asym.py --quick
    python benchmarks/placement_study.py --report docs/table1/results-12ep.jsonl  # no training
"""
import argparse
import ast
import concurrent.futures
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's Table 1 (MoCo v2, ImageNet linear probe, 100 epochs): top-1 per placement
PAPER_BASELINE = 65.8
PAPER = {"MultiCrop": {"source": 69.9, "target": 57.1, "both": 61.7},
         "ScaleMix": {"source": 67.3, "target": 52.8, "both": 64.8},
         "WeakerAug": {"source": 51.0, "target": 67.2, "both": 46.8},
         "StrongerAug": {"source": 66.7, "target": 62.2, "both": 66.2},
         "SyncBN": {"source": 64.7, "target": 66.5, "both": 66.0}}
# MeanEnc as (n_s, n_t) views averaged on the source and the target (the paper: 4 in all, or 3)
PAPER_MEANENC = {(1, 3): 67.9, (2, 2): 67.1, (3, 1): 59.9, (1, 2): 67.5}
QUICK = {"designs": ["ScaleMix", "WeakerAug"], "sides": ["source", "target"], "seeds": [0],
         "meanenc": []}
# the correlation's confidence: permutations for its p-value, resamples for its interval (seeded)
N_PERMUTATIONS, N_BOOTSTRAP = 9999, 2000
OUTCOMES = {"top1": "kNN top-1", "gain": "kNN gain over random start"}
BYOL_NOTE = ("note: BYOL's CPU example does not rise above its random start within a few epochs, "
             "at any setting tried here and in an independent BYOL: BYOL starts slowly. Read its "
             "rows as a check that every placement trains, not as Table 1.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Examples:"):])
    p.add_argument("--script", default="mocov2_asym.py", help="one of the six *_asym.py scripts")
    p.add_argument("--designs", nargs="*", default=list(PAPER), choices=list(PAPER),
                   help="the designs placed on --sides (default: all five)")
    p.add_argument("--sides", nargs="*", default=["source", "target"],
                   choices=["source", "target", "both"], help="default: source target")
    p.add_argument("--meanenc", nargs="*", default=[f"{s},{t}" for s, t in PAPER_MEANENC],
                   metavar="NS,NT", help="MeanEnc rows: views averaged on source, target "
                   "(default: the paper's 1,3 2,2 3,1 1,2)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the CPU example's, 6 for "
                   "MoCo v2, the quick start's schedule)")
    p.add_argument("--knn-every", type=int, help="kNN top-1 every N epochs, and at 0 and the end "
                   "(default: half the epochs, so the midpoint is read too)")
    p.add_argument("--quick", action="store_true", help="ScaleMix and WeakerAug on source and "
                   "target plus the baseline, one seed: the teaching version")
    p.add_argument("--jobs", type=int, default=os.cpu_count(),
                   help="runs at once, one thread each (default: the CPUs)")
    p.add_argument("--output-dir", default="runs/placement", help="default: runs/placement")
    p.add_argument("--report", metavar="RESULTS", help="train nothing: the tables, correlation "
                   "and picture of a study's results.jsonl (its rows, seeds and epochs)")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: more flags for every run (they override the example's)")
    args = p.parse_args(argv)
    if args.quick:
        args.designs, args.sides, args.seeds, args.meanenc = (QUICK[k] for k in
                                                              ("designs", "sides", "seeds",
                                                               "meanenc"))
    args.extra = [a for a in args.extra if a != "--"]
    args.meanenc = [tuple(int(n) for n in pair.split(",")) for pair in args.meanenc]
    example = cpu_example(args.script) if os.path.isfile(os.path.join(ROOT, args.script)) else []
    if args.epochs is None:
        args.epochs = int(example[example.index("--epochs") + 1]) if "--epochs" in example else 3
    args.knn_every = args.knn_every or max(1, args.epochs // 2)
    return args


def cpu_example(script):
    """The flags of the script's own CPU example: the first `python <script> ...` command of its
    docstring (continuation lines joined), without the interpreter and the script."""
    source = open(os.path.join(ROOT, script)).read()
    doc = ast.get_docstring(ast.parse(source))
    lines = doc[doc.index("Examples:"):].splitlines()[1:]
    command = []
    for line in lines:
        command.append(line.split("#")[0].strip().rstrip("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(" ".join(command))
    return words[words.index(script) + 1:]


# ---- the rows: one per design and side (MeanEnc: per views pair) -------------------------------
def rows(args):
    """[(row name, design, side, flags, paper top-1)] in the paper's order, the baseline first."""
    out = [("baseline", "baseline", None, [], PAPER_BASELINE)]
    for design in args.designs:
        for side in args.sides:
            if design in ("WeakerAug", "StrongerAug"):
                aug = design[:-3].lower()  # weaker, stronger
                sides = ["source", "target"] if side == "both" else [side]
                flags = [word for s in sides for word in (f"--{s}-aug", aug)]
            else:
                flag = {"MultiCrop": "--multicrop-on", "ScaleMix": "--scalemix-on",
                        "SyncBN": "--syncbn-on"}[design]
                flags = [flag, side]
            out.append((f"{design} {side}", design, side, flags, PAPER[design][side]))
    for n_s, n_t in args.meanenc:
        out.append((f"MeanEnc ({n_s},{n_t})", "MeanEnc", (n_s, n_t),
                    ["--mean-enc-source", str(n_s), "--mean-enc", str(n_t)],
                    PAPER_MEANENC.get((n_s, n_t))))
    return out


def run_dir(args, name, seed):
    return os.path.join(args.output_dir, "runs", name.replace(" ", "-").replace(",", "-")
                        .replace("(", "").replace(")", "") + f"-seed{seed}")


def train(args, name, flags, seed):
    """One run of the script (one thread) -> its result: kNN top-1 per epoch, v_source and
    v_target at the end, wall seconds; or its error line."""
    out = run_dir(args, name, seed)
    command = [sys.executable, os.path.join(ROOT, args.script)] + cpu_example(args.script) + [
        "--epochs", str(args.epochs), "--knn-every", str(args.knn_every), "--variance-every", "0",
        "--workers", "0", "--seed", str(seed), "--output-dir", out] + flags + args.extra
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    result = {"row": name, "seed": seed, "flags": flags, "seconds": round(time.time() - start, 1)}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
        return {**result, "error": lines[-1]}
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    knn = {r["epoch"]: r["knn_top1"] for r in log if "knn_top1" in r}
    end = max([r["step"] for r in log if "loss" in r], default=0)  # the last step trained
    monitor = [r for r in log if "v_source" in r and r["step"] == end]
    if not monitor or not any("knn_top1" in r and r["step"] == end for r in log):
        return {**result, "error": f"{out}/log.jsonl: no kNN or variances at the end"}
    monitor = monitor[-1]
    if "already finished" in proc.stdout or any("resumed" in r for r in log):
        result["seconds_partial"] = True  # the seconds of this call, not the run's
    return {**result, "knn": {f"{epoch:g}": top1 for epoch, top1 in knn.items()},
            "top1": knn[max(knn)], "v_source": monitor["v_source"], "v_target": monitor["v_target"]}


# ---- statistics: mean and spread over seeds, an ordering beyond the noise ----------------------
def mean_sd(values):
    """-> mean, sample standard deviation (None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def verdict(a, b, paper_sign):
    """Whether the ordering a - b (lists of per-seed top-1) agrees with the paper's sign: "holds"
    (the same sign, beyond twice the standard error of the difference), "agrees within noise",
    "contradicts" (the other sign, beyond the noise) or "opposite within noise"; with one seed
    each there is no noise estimate: "agrees (1 seed)" or "opposite (1 seed)". -> (diff, se,
    verdict)."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    diff = ma - mb
    same = (diff > 0) == (paper_sign > 0)
    if sa is None or sb is None:
        return diff, None, "agrees (1 seed)" if same else "opposite (1 seed)"
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    beyond = abs(diff) > 2 * se
    return diff, se, ("holds" if beyond else "agrees within noise") if same else \
        ("contradicts" if beyond else "opposite within noise")


def orderings(table, results):
    """Per design: its source row against its target row (MeanEnc: (3,1) against (1,3)) and the
    paper's sign. -> [(design, diff, se, paper diff, verdict)]."""
    by_row = {name: [r["top1"] for r in results if r["row"] == name and "top1" in r]
              for name, *_ in table}
    out = []
    pairs = [(d, f"{d} source", f"{d} target", PAPER[d]["source"] - PAPER[d]["target"])
             for d in PAPER] + [("MeanEnc", "MeanEnc (3,1)", "MeanEnc (1,3)",
                                 PAPER_MEANENC[(3, 1)] - PAPER_MEANENC[(1, 3)])]
    for design, source, target, paper in pairs:
        if by_row.get(source) and by_row.get(target):
            diff, se, word = verdict(by_row[source], by_row[target], paper)
            out.append((design, diff, se, paper, word))
    return out


def mean_spread(values, sign=""):
    """The seeds' mean +- sd, as text ("-" where a run lacks the figure: an older log, say)."""
    if not values or None in values:
        return "-"
    mean, sd = mean_sd(values)
    return f"{mean:{sign}.1f}" + (f" +- {sd:.1f}" if sd is not None else "")


def format_row(name, paper, values, baseline, half):
    """A row: the final kNN top-1, at epoch `half` (the midpoint) and its gain over the run's own
    random start (epoch 0), so that an ordering is seen to grow or shrink with training."""
    mean = mean_sd([r["top1"] for r in values])[0]
    middle = mean_spread([r.get("knn", {}).get(half) for r in values])
    start = [r.get("knn", {}).get("0") for r in values]
    gain = mean_spread([None if s is None else r["top1"] - s for r, s in zip(values, start)], "+")
    delta = "" if name == "baseline" or baseline is None else f"{mean - baseline:+.1f}"
    paper_text = "-" if paper is None else f"{paper:.1f}"
    paper_delta = "" if name == "baseline" or paper is None else f"{paper - PAPER_BASELINE:+.1f}"
    v_s = sum(r["v_source"] for r in values) / len(values)
    v_t = sum(r["v_target"] for r in values) / len(values)
    return (f"| {name} | {mean_spread([r['top1'] for r in values])} | {middle} | {gain} | "
            f"{delta} | {paper_text} | {paper_delta} | {v_s * 1e4:.2f} | {v_t * 1e4:.2f} |")


def header(args):
    return [f"| placement | kNN top-1 (seeds) | kNN at epoch {args.epochs // 2} (seeds) | gain "
            f"over random start | vs baseline | paper | paper vs baseline | v_source (x1e-4) | "
            f"v_target (x1e-4) |", "|---|---|---|---|---|---|---|---|---|"]


def tables(args, table, results):
    """The study's tables as markdown lines (rows with every seed done; the others marked)."""
    done = {name: [r for r in results if r["row"] == name and "top1" in r] for name, *_ in table}
    base = done.get("baseline")
    baseline = mean_sd([r["top1"] for r in base])[0] if base else None
    lines = header(args)
    for name, _, _, _, paper in table:
        failed = [r for r in results if r["row"] == name and "error" in r]
        if failed:
            lines.append(f"| {name} | failed: {failed[0]['error']} |" + " |" * 7)
        elif len(done[name]) == len(args.seeds):
            lines.append(format_row(name, paper, done[name], baseline, f"{args.epochs // 2}"))
        else:
            lines.append(f"| {name} | ({len(done[name])} of {len(args.seeds)} seeds) |" + " |" * 7)
    found = orderings(table, results)
    if found:
        lines += ["", "| design | source - target (ours) | paper | ordering |", "|---|---|---|---|"]
        for design, diff, se, paper, word in found:
            noise = f" +- {se:.1f}" if se is not None else ""
            lines.append(f"| {design} | {diff:+.1f}{noise} | {paper:+.1f} | {word} |")
    return lines


# ---- the paper's claim over every run: a less variable target, a better encoder ----------------
def ranks(values):
    """1-based ranks, ties sharing their average rank (Spearman's convention)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    out = np.empty(len(values))
    out[order] = np.repeat(first + (counts + 1) / 2, counts)
    return out


def spearman(x, y):
    """Spearman's rho: Pearson's correlation of the average ranks; None with under 3 pairs or a
    constant variable (no ordering to compare)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    cx, cy = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    return float(np.clip(cx @ cy / math.sqrt((cx @ cx) * (cy @ cy)), -1, 1))


def permutation_p(x, y, n=N_PERMUTATIONS, seed=0):
    """Two-sided p-value of rho against y shuffled n times (seeded, so it repeats), with the +1
    correction: (shuffles at least as far from 0, + 1) / (n + 1), which is never too small, at
    any number of runs (with few, the shuffles themselves are few: p cannot fall far)."""
    cx, cy = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    scale = math.sqrt((cx @ cx) * (cy @ cy))  # a shuffle keeps the ranks, so their spread
    shuffled = np.random.default_rng(seed).permuted(np.tile(cy, (n, 1)), axis=1) @ cx / scale
    count = int(np.sum(np.abs(shuffled) >= abs(cx @ cy / scale) - 1e-12))  # ties count
    return (count + 1) / (n + 1)


def bootstrap_interval(x, y, n=N_BOOTSTRAP, seed=0):
    """Percentile 95% interval of rho over n resamples of the runs (seeded); resamples whose rho
    is undefined (a constant variable) are left out. -> (low, high), or None if all are."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(x), (n, len(x)))
    rhos = [rho for rho in (spearman(x[i], y[i]) for i in picks) if rho is not None]
    return tuple(float(q) for q in np.percentile(rhos, [2.5, 97.5])) if rhos else None


def correlation(results, key):
    """rho(log v_target/v_source at the end, key: "top1" or "gain", the top-1 over the run's own
    epoch-0 kNN) over the successful runs (ranked: the ratio's ranks are its log's). -> (runs,
    rho, (low, high) or None, p); rho, interval and p None where rho is undefined."""
    runs = [r for r in results if "top1" in r and r["v_source"] > 0
            and (key == "top1" or "0" in r.get("knn", {}))]
    x = [r["v_target"] / r["v_source"] for r in runs]
    y = [r["top1"] - (r["knn"]["0"] if key == "gain" else 0) for r in runs]
    rho = spearman(x, y)
    if rho is None:
        return len(runs), None, None, None
    return len(runs), rho, bootstrap_interval(x, y), permutation_p(x, y)


def format_correlation(key, runs, rho, interval, p, among="", unit="runs"):
    """The correlation in words: its sign against the paper's claim (negative: a target less
    variable than the source learns better) and whether it is beyond chance at 5%."""
    head = f"Spearman rho(log v_target/v_source, {OUTCOMES[key]}){among}"
    if rho is None:
        why = "it needs 3 or more" if runs < 3 else "one of the two is the same in every run"
        return f"{head} undefined over {runs} {unit}: {why}"
    bounds = "undefined" if interval is None else f"{interval[0]:.2f} to {interval[1]:.2f}"
    sign = ("negative, as the paper's claim predicts" if rho < 0 else
            "positive, against the paper's claim" if rho > 0 else "zero, no sign either way")
    chance = "beyond chance at 5%" if p < 0.05 else "not beyond chance at 5%"
    return (f"{head} = {rho:.2f} over {runs} {unit} (95% bootstrap interval {bounds}; permutation "
            f"p = {p:.3g}, two-sided): {sign}, {chance}")


def study_runs(args, table, results):
    """The study's successful runs (its rows, its seeds) in the table's order, then by seed: the
    seeded permutations and resamples then give the same figures however the runs finished."""
    order = {name: i for i, (name, *_) in enumerate(table)}
    return sorted((r for r in results if "top1" in r and r["row"] in order
                   and r["seed"] in args.seeds), key=lambda r: (order[r["row"]], r["seed"]))


def acts_on(side, where):
    """Whether a row's design acts on `side`: placed there (or both), or, for MeanEnc (n_s, n_t),
    more views averaged there."""
    if isinstance(where, tuple):
        n_s, n_t = where
        return n_t > n_s if side == "target" else n_s > n_t
    return where in (side, "both")


def placement_means(runs, rows):
    """One point per placement of `rows` with runs: its runs' mean top-1 and the geometric mean of
    their v_target / v_source (as v_target, with v_source 1), in the form correlation() reads."""
    out = []
    for name in rows:
        mine = [r for r in runs if r["row"] == name]
        if mine:
            log_ratio = np.mean([math.log(r["v_target"] / r["v_source"]) for r in mine])
            out.append({"row": name, "top1": float(np.mean([r["top1"] for r in mine])),
                        "v_source": 1.0, "v_target": math.exp(log_ratio)})
    return out


def correlation_lines(args, table, results):
    """The lines after the tables: over the runs, the correlation with the final top-1 and with
    the gain; then over the placements (row means) of the designs on one side and the baseline:
    a ratio below 1 comes from a calmer target or from a noisier source, which need not go with
    accuracy alike, and a row's seeds share their design (the placement is the unit)."""
    runs = study_runs(args, table, results)
    lines = [""] + [format_correlation(key, *correlation(runs, key)) for key in OUTCOMES]
    for side in ("target", "source"):
        rows = [name for name, design, where, *_ in table
                if design == "baseline" or acts_on(side, where)]
        if len(rows) > 1:
            lines.append(format_correlation(
                "top1", *correlation(placement_means(runs, rows), "top1"), unit="placements",
                among=f" of the row means, the designs on the {side} and the baseline"))
    return lines


def plot(args, table, results, path):
    """placement.png: top-1 per placement (mean, seed spread), v_source against v_target, and
    each run's top-1 against its v_target / v_source (the paper's claim: falling to the right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no picture: matplotlib is missing (pip install -r requirements-extra.txt)")
        return
    names = [name for name, *_ in table if any(r["row"] == name and "top1" in r for r in results)]
    stats = [mean_sd([r["top1"] for r in results if r["row"] == n and "top1" in r]) for n in names]
    colours = ["grey" if n == "baseline" else "tab:blue" if "source" in n or "(3,1)" in n
               else "tab:orange" if "target" in n or "(1,3)" in n else "tab:green" for n in names]
    fig, (left, right, runs_ax) = plt.subplots(1, 3, figsize=(19, 0.35 * len(names) + 2))
    left.barh(range(len(names)), [m for m, _ in stats], xerr=[s or 0 for _, s in stats],
              color=colours)
    left.set_yticks(range(len(names)), names)
    left.invert_yaxis()
    left.set_xlim(min(m for m, _ in stats) - 5, max(m for m, _ in stats) + 5)
    left.set_xlabel(f"kNN top-1 after {args.epochs} epochs (mean, seed sd)")
    for name, colour in zip(names, colours):
        runs = [r for r in results if r["row"] == name and "top1" in r]
        right.scatter([r["v_source"] * 1e4 for r in runs], [r["v_target"] * 1e4 for r in runs],
                      color=colour, s=18)
        right.annotate(name, (runs[0]["v_source"] * 1e4, runs[0]["v_target"] * 1e4), fontsize=7)
    low = min(min(r["v_source"], r["v_target"]) for r in results if "top1" in r) * 1e4
    high = max(max(r["v_source"], r["v_target"]) for r in results if "top1" in r) * 1e4
    right.plot([low, high], [low, high], color="black", linewidth=0.5)
    right.set_xlabel("v_source (x1e-4)")
    right.set_ylabel("v_target (x1e-4)")
    right.set_title("below the line: the target varies less (the paper's placement)", fontsize=9)
    runs = [r for r in study_runs(args, table, results) if r["v_source"] > 0]
    for name, colour in zip(names, colours):
        mine = [r for r in runs if r["row"] == name]
        runs_ax.scatter([r["v_target"] / r["v_source"] for r in mine], [r["top1"] for r in mine],
                        color=colour, s=18)
    runs_ax.set_xscale("log")
    runs_ax.axvline(1, color="black", linewidth=0.5)
    runs_ax.set_xlabel("v_target / v_source at the end (log)")
    runs_ax.set_ylabel(f"kNN top-1 after {args.epochs} epochs")
    n, rho, _, p = correlation(runs, "top1")
    runs_ax.set_title(f"each run: Spearman rho = {rho:.2f}, p = {p:.3g} ({n} runs)"
                      if rho is not None else f"each run: rho undefined ({n} runs)", fontsize=9)
    fig.suptitle(f"{args.script}: placements of the asymmetric designs, {len(args.seeds)} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"picture: {path}")


def report(args, table, results, start):
    """The tables and the correlation, printed and in table.md; the picture."""
    lines = tables(args, table, results) + correlation_lines(args, table, results)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    whole = [r["seconds"] for r in results if not r.get("seconds_partial")]
    partial = len(results) - len(whole)
    partial = f" ({partial} more timed in part: resumed)" if partial else ""
    this = f"read back from {args.report}" if args.report else \
        f"this call {(time.time() - start) / 60:.1f} min wall"
    print(f"\n{args.script}, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}: "
          f"{len(results)} runs; {len(whole)} timed whole took {sum(whole) / 60:.0f} CPU-thread "
          f"minutes{partial}; {this}")
    print("\n".join(lines))
    if results:
        plot(args, table, results, os.path.join(args.output_dir, "placement.png"))


def read_back(args):
    """--report: a finished study's results; its seeds, epochs (the last kNN's) and rows."""
    if not os.path.isfile(args.report):
        sys.exit(f"error: --report {args.report}: no such file")
    results = [r for r in map(json.loads, open(args.report)) if "top1" in r]
    if not results:
        sys.exit(f"error: --report {args.report}: no finished run in it")
    args.seeds = sorted({r["seed"] for r in results})
    args.epochs = max(round(float(epoch)) for r in results for epoch in r["knn"])
    names = {r["row"] for r in results}
    args.designs, args.sides = list(PAPER), ["source", "target", "both"]
    args.meanenc = [tuple(int(n) for n in name[9:-1].split(",")) for name in sorted(names)
                    if name.startswith("MeanEnc (")]
    return [row for row in rows(args) if row[0] in names], results


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(ROOT, args.script)):
        sys.exit(f"error: --script {args.script}: no such script in {ROOT}")
    os.makedirs(args.output_dir, exist_ok=True)
    if args.report:
        table, results = read_back(args)
        return report(args, table, results, time.time())
    path = os.path.join(args.output_dir, "results.jsonl")
    results = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    table = rows(args)
    wanted = [(name, flags, seed) for name, _, _, flags, _ in table for seed in args.seeds]
    finished = {(r["row"], r["seed"]) for r in results if "error" not in r}
    results = [r for r in results if (r["row"], r["seed"]) in finished]  # failed ones again
    todo = [(name, flags, seed) for name, flags, seed in wanted if (name, seed) not in finished]
    print(f"{args.script}: {len(table)} rows x {len(args.seeds)} seeds, {args.epochs} epochs "
          f"each; {len(wanted) - len(todo)} runs done before, {len(todo)} to run, {args.jobs} "
          f"at once; example flags: {' '.join(cpu_example(args.script))}", flush=True)
    if args.script.startswith("byol"):
        print(BYOL_NOTE, flush=True)
    print("\n".join(header(args)), flush=True)
    lock, start = threading.Lock(), time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(train, args, name, flags, seed) for name, flags, seed in todo]
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            with lock, open(path, "a") as f:
                f.write(json.dumps(result) + "\n")
            results.append(result)
            if all((result["row"], s) in {(r["row"], r["seed"]) for r in results}
                   for s in args.seeds):  # a row is complete: its line, as it will stand
                line = next(line for line in tables(args, table, results)
                            if line.startswith(f"| {result['row']} |"))
                print(f"{line}  ({time.time() - start:.0f} s)", flush=True)
    report(args, table, results, start)


if __name__ == "__main__":
    main()
