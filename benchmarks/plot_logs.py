"""Any logged quantity against epochs, for several runs' log.jsonl files, in one PNG (one panel per
quantity, one line per run), and a markdown summary of each run's last and best values (the least loss or time, the largest
accuracy).

    python benchmarks/plot_logs.py runs/cifar_baseline runs/cifar_asym --out cifar.png
    python benchmarks/plot_logs.py runs/*/log.jsonl --keys knn_top1 loss std_source --labels a b c --out runs.png
    python benchmarks/plot_logs.py runs/baseline runs/asym --keys variance v_ratio --out variance.png

A run is a log.jsonl file or the output directory that holds one. Every numeric key of the log
works: a panel draws the records that have the key (knn_top1 every few epochs, loss every
--print-freq steps) against --x (epoch by default). The key `variance` is one panel of the variance
monitor's v_source (solid) and v_target (dashed) per run; by default it is drawn after knn_top1
and loss when a log has them. matplotlib is optional: the summary needs only json, and without
matplotlib the drawing says how to install it (exit status 2).
"""
import argparse
import json
import math
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="logged quantities of several runs against epochs, in one PNG",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="log.jsonl files or the output directories holding them")
    p.add_argument("--keys", nargs="+", help="logged keys, one panel each; variance: v_source and v_target in one "
                   "(default: knn_top1 loss, and variance where a log has it)")
    p.add_argument("--x", default="epoch", help="the key on the horizontal axis")
    p.add_argument("--labels", nargs="+", help="one name per run (default: the run's directory name)")
    p.add_argument("--title", default="", help="the figure's title")
    p.add_argument("--out", help="the PNG to write (none: only the summary)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f"{len(args.labels)} --labels for {len(args.runs)} runs")
    return args


def log_path(run):
    """A run's log.jsonl: the file itself or the one in the directory."""
    return os.path.join(run, "log.jsonl") if os.path.isdir(run) else run


def read_log(run):
    """-> the log's records (dicts); a line cut short by a killed run is skipped."""
    records = []
    with open(log_path(run)) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records, key, x="epoch"):
    """The (x, value) pairs of the records that log both as numbers, in the log's order."""
    return [(r[x], r[key]) for r in records if is_number(r.get(x)) and is_number(r.get(key))]


VARIANCE = "variance"  # one panel: the variance monitor's v_source (solid) and v_target (dashed)
SIDES = {"v_source": "-", "v_target": "--"}


def default_keys(runs):
    """knn_top1 and loss, and the variance panel where a run's log has the variance monitor's records."""
    return ["knn_top1", "loss"] + ([VARIANCE] if any(series(read_log(run), "v_source") for run in runs) else [])


def label(run):
    path = os.path.abspath(log_path(run))
    return os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "log.jsonl" else os.path.basename(path)


def best(key, values):
    """The best of a key's values: the least for losses and times, the largest for accuracies and
    speeds; None where neither is better (a variance, a learning rate)."""
    if "loss" in key or "time" in key:
        return min(values)
    if any(word in key for word in ("top1", "top5", "acc", "score", "per_s")):
        return max(values)
    return None


def summary(runs, keys, x="epoch", labels=None):
    """Markdown rows: per run and key, how many points, the last (x, value) and the best value (the
    least loss or time, the largest accuracy or speed; - for the others)."""
    lines = [f"| run | key | points | last {x} | last | best |", "|---|---|---|---|---|---|"]
    keys = [k for key in keys for k in (SIDES if key == VARIANCE else [key])]
    for run, name in zip(runs, labels or [label(r) for r in runs]):
        records = read_log(run)
        for key in keys:
            points = series(records, key, x)
            if points:
                top = best(key, [v for _, v in points])
                lines.append(f"| {name} | {key} | {len(points)} | {points[-1][0]:.4g} | {points[-1][1]:.4g} | "
                             f"{'-' if top is None else f'{top:.4g}'} |")
            else:
                lines.append(f"| {name} | {key} | 0 | - | - | - |")
    return lines


def draw(runs, keys, out, x="epoch", labels=None, title=""):
    """One panel per key, one line per run (markers where a key is logged rarely, as knn_top1) -> out (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("drawing needs matplotlib (pip install -r requirements-extra.txt); the summary "
                          "needs nothing") from None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for i, (run, name) in enumerate(zip(runs, labels or [label(r) for r in runs])):
        records = read_log(run)
        for ax, key in zip(axes[0], keys):
            for k, style in (SIDES.items() if key == VARIANCE else [(key, "-")]):
                points = series(records, k, x)
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=f"C{i}", marker="o" if len(points) <= 30 else None, markersize=4,
                            label=f"{name} {k}" if key == VARIANCE else name)
    for ax, key in zip(axes[0], keys):
        ax.set_xlabel(x)
        ax.set_ylabel("v_source (solid), v_target (dashed)" if key == VARIANCE else key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    args = parse_args(argv)
    missing = [run for run in args.runs if not os.path.exists(log_path(run))]
    if missing:
        print(f"error: no log.jsonl at {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    keys = args.keys or default_keys(args.runs)
    print("\n".join(summary(args.runs, keys, args.x, args.labels)), flush=True)
    if args.out:
        try:
            draw(args.runs, keys, args.out, args.x, args.labels, args.title)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"plot: {args.out}", flush=True)


if __name__ == "__main__":
    main()
