r"""The asymmetry paper's claim on CIFAR-10 in a few minutes of one GPU: MoCo v2 (ResNet-18 with the
CIFAR stem, 32 px, README's small-data settings, every view made on the device) trained twice for
the same number of epochs, the baseline and the composition `--multicrop --asym-bn --mean-enc 2`,
both at once on one GPU, kNN top-1 every few epochs printed as it comes, then side by side.

    python benchmarks/cifar_compare.py --cifar-tar data/cifar10-jpg.tar.gz --budget 240 \
        --out results
    python benchmarks/cifar_compare.py --cifar-tar data/cifar10-jpg.tar.gz --tiny --per-class 30 \
        --budget 60

Unless --epochs is given, the epochs come from measured throughput: the step of both configurations
is timed first (benchmarks/throughput.py, with and without channels-last; the faster memory format
is used for both runs), and E is the largest number of epochs for which E epochs of both runs,
their kNN evaluations (every --knn-every epochs, by default about five of them) and start-up fit in
--budget seconds (the two runs share the GPU, so their times add up). --tiny is the CPU scale of
the same machinery (ImageNet stem: 16x fewer FLOPs at 32 px, batch 32): it tests the recipe's
plumbing, not the claim. The runs and their checkpoints stay in --work-dir; --out receives the
two logs (cifar_baseline.jsonl, cifar_asym.jsonl) and the plot (cifar_knn.png, with matplotlib).
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import plot_logs  # noqa: E402  (after the path)

# README's "MoCo v2 on CIFAR-10" settings, every view made on the device
RECIPE = ["--arch", "resnet18", "--cifar-stem", "--image-size", "32", "--batch-size", "512",
          "--lr", "0.03", "--wd", "5e-4", "--queue-size", "4096", "--ema", "0.99",
          "--temperature", "0.1", "--bn-splits", "8", "--data-on-device", "--print-freq", "20"]
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "32", "--lr", "0.03",
        "--wd", "5e-4", "--queue-size", "256", "--ema", "0.99", "--temperature", "0.1",
        "--bn-splits", "2", "--data-on-device", "--print-freq", "5"]
RUNS = {"baseline": "", "asym": "--multicrop --asym-bn --mean-enc 2"}
# two processes: imports, decoding the images into the device, cuDNN autotuning
# (measured: see README)
STARTUP_S = 20
KNN_LOADER_S = 3  # a kNN evaluation's loader start-up and JPEG decoding, beside its forward passes
PEERS = ("Peers at longer schedules (ResNet-18, CIFAR-10): the MoCo CIFAR demo's kNN 82.6% at "
         "200 epochs, 86.3% at 400, 88.7% at 800 (asymmetric loss); lightly's MoCo kNN 85% at "
         "200 epochs (batch 512); solo-learn's MoCo v2+ 92.9% linear at 1000. None publishes "
         "accuracy after a few epochs.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MoCo v2 baseline vs --multicrop --asym-bn "
                                            "--mean-enc 2 on CIFAR-10, in minutes",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cifar-tar", help="the CIFAR-10 JPEG tarball (cifar10/train/<class>/*.jpg, "
                                       "cifar10/test/...)")
    p.add_argument("--data", help="or an ImageFolder root with train/ and test/ already extracted")
    p.add_argument("--per-class", type=int, default=0,
                   help="training images per class taken from the tarball (0: all); "
                        "test images: a fifth as many")
    p.add_argument("--budget", type=float, default=240,
                   help="seconds for both runs together, start-up and kNN included")
    p.add_argument("--epochs", type=int, default=0,
                   help="epochs of each run (0: as many as fit in --budget)")
    p.add_argument("--max-epochs", type=int, default=200,
                   help="the most epochs --budget may choose")
    p.add_argument("--knn-every", type=int, default=0,
                   help="kNN every N epochs (0: about five evaluations)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU scale: ImageNet stem, batch 32, queue 256 "
                        "(the plumbing, not the claim)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="data workers per run (kNN, decoding)")
    p.add_argument("--work-dir", help="runs and checkpoints (default: a new temporary directory)")
    p.add_argument("--out", help="where the two logs and the plot are copied")
    args = p.parse_args(argv)
    if bool(args.cifar_tar) == bool(args.data):
        p.error("give one of --cifar-tar or --data")
    return args


def extract_cifar(tar_path, out, per_class=0):
    """The tarball's JPEGs as out/train/<class>/ and out/test/<class>/ (per_class training images
    of each class and a fifth as many test images, or all) -> out."""
    counts = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if (not member.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test")
                    or not parts[-1].endswith(".jpg")):
                continue
            split, cls, name = parts[-3:]
            limit = per_class if split == "train" else max(1, per_class // 5)
            if per_class and counts.get((split, cls), 0) >= limit:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            os.makedirs(os.path.join(out, split, cls), exist_ok=True)
            with tar.extractfile(member) as src, \
                    open(os.path.join(out, split, cls, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not counts:
        raise SystemExit(f"error: no CIFAR-10 JPEGs in {tar_path}")
    return out


def count_images(root, split):
    return sum(len(files) for _, _, files in os.walk(os.path.join(root, split)))


def calibrate(base_flags, tiny):
    """Step times of both configurations (and with channels-last, on a GPU), printed as rows ->
    ({run: seconds per step}, whether channels-last is used)."""
    import torch
    import throughput
    layouts = [""] if tiny or not torch.cuda.is_available() else ["", " --channels-last"]
    compare = [f"{RUNS[run]}{layout}".strip() for layout in layouts for run in RUNS]
    bench = throughput.parse_args(["mocov2_asym.py", "--steps", "2" if tiny else "10",
                                   "--warmup", "1" if tiny else "3",
                                   "--repeats", "1" if tiny else "2", "--no-flops",
                                   "--compare", *compare, "--", *base_flags])
    rows, _ = throughput.run(bench)
    seconds = {row["config"]: row["step_ms"] / 1e3 for row in rows if "error" not in row}
    per_layout = []
    for layout in layouts:
        keys = [(f"{RUNS[run]}{layout}".strip() or "(base)") for run in RUNS]
        if all(k in seconds for k in keys):
            per_layout.append((sum(seconds[k] for k in keys), layout,
                               dict(zip(RUNS, (seconds[k] for k in keys)))))
    if not per_layout:
        raise SystemExit("error: neither configuration could be timed (see the rows above)")
    _, layout, times = min(per_layout)
    return times, layout == " --channels-last"


def estimate_seconds(epochs, every, step_s, steps_per_epoch, eval_images, batch_size):
    """Both runs' seconds on one GPU (their times add up): start-up, epochs x steps, and the kNN
    evaluations (before training, every `every` epochs, at the end), each one forward of eval_images
    (a quarter of a MoCo step's work per image: source forward and backward three, target forward
    one) plus KNN_LOADER_S."""
    evaluations = 1 + epochs // every + (epochs % every > 0)
    return STARTUP_S + sum(epochs * steps_per_epoch * s
                           + evaluations * (eval_images * s / batch_size / 4 + KNN_LOADER_S)
                           for s in step_s.values())


def knn_interval(epochs, knn_every=0):
    return knn_every or max(1, round(epochs / 5))  # about five evaluations


def choose_epochs(step_s, steps_per_epoch, eval_images, batch_size, budget, max_epochs,
                  knn_every=0):
    """The largest E <= max_epochs (at least 1) whose estimate_seconds fits in `budget` -> E."""
    best = 1
    for epochs in range(1, max_epochs + 1):
        if estimate_seconds(epochs, knn_interval(epochs, knn_every), step_s, steps_per_epoch,
                            eval_images, batch_size) > budget:
            break
        best = epochs
    return best


def knn_rows(log, seen):
    """New knn_top1 records of a run's log since `seen` of them -> the new records."""
    if not os.path.exists(log):
        return []
    records = [r for r in plot_logs.read_log(log) if "knn_top1" in r]
    return records[seen:]


def last_loss(log):
    losses = plot_logs.series(plot_logs.read_log(log), "loss") if os.path.exists(log) else []
    return losses[-1][1] if losses else math.nan


def run_both(data, flags, epochs, every, work, workers):
    """Both runs at once; each kNN result printed as a row when it appears
    -> {run: (exit code, seconds)}."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs, started, done = {}, time.time(), {}
    for run, extra in RUNS.items():
        out = os.path.join(work, run)
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, os.path.join(ROOT, "mocov2_asym.py"), "--data", data, *flags,
               *extra.split(), "--epochs", str(epochs), "--knn-every", str(every),
               "--workers", str(workers), "--output-dir", out]
        print(f"`{' '.join(cmd[1:])}`", flush=True)
        with open(os.path.join(out, "stdout.txt"), "w") as f:
            procs[run] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                          cwd=ROOT)
    print("\n| run | epoch | kNN top-1 % | last loss | seconds |\n|---|---|---|---|---|",
          flush=True)
    seen = dict.fromkeys(RUNS, 0)
    while len(done) < len(procs):
        time.sleep(1)
        for run, proc in procs.items():
            log = os.path.join(work, run, "log.jsonl")
            for r in knn_rows(log, seen[run]):
                loss = last_loss(log) if r["epoch"] else math.nan
                print(f"| {run} | {r['epoch']:.0f} | {r['knn_top1']:.2f} | "
                      f"{'-' if math.isnan(loss) else f'{loss:.3f}'} | "
                      f"{time.time() - started:.0f} |", flush=True)
                seen[run] += 1
            if run not in done and proc.poll() is not None:
                done[run] = (proc.returncode, time.time() - started)
    return done


def side_by_side(work):
    """Markdown rows: kNN top-1 of both runs at each evaluated epoch."""
    knn = {run: {round(r["epoch"]): r["knn_top1"]
                 for r in knn_rows(os.path.join(work, run, "log.jsonl"), 0)}
           for run in RUNS}
    lines = ["| epoch | baseline kNN % | `" + RUNS["asym"] + "` kNN % | difference |",
             "|---|---|---|---|"]
    for epoch in sorted(set(knn["baseline"]) | set(knn["asym"])):
        a, b = knn["baseline"].get(epoch), knn["asym"].get(epoch)
        cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {epoch} | {cell(a)} | {cell(b)} | "
                     f"{'-' if a is None or b is None else f'{b - a:+.2f}'} |")
    return lines


def collect(work, out):
    """Copy both runs' logs to out and draw kNN top-1, loss and (where logged) the variance
    monitor's v_source and v_target against epochs -> the PNG (ImportError without matplotlib)."""
    os.makedirs(out, exist_ok=True)
    logs = []
    for run in RUNS:
        log = os.path.join(work, run, "log.jsonl")
        if os.path.exists(log):
            shutil.copy(log, os.path.join(out, f"cifar_{run}.jsonl"))
            logs.append(log)
    if not logs:
        return None
    labels = [f"{run} {RUNS[run]}".strip() for run in RUNS
              if os.path.exists(os.path.join(work, run, "log.jsonl"))]
    return plot_logs.draw(logs, plot_logs.default_keys(logs), os.path.join(out, "cifar_knn.png"),
                          labels=labels, title="MoCo v2, ResNet-18, CIFAR-10")


def main(argv=None):
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="cifar_compare_")
    start = time.time()
    data = args.data or extract_cifar(args.cifar_tar, os.path.join(work, "cifar10"), args.per_class)
    n_train, n_test = count_images(data, "train"), count_images(data, "test")
    flags = TINY if args.tiny else RECIPE
    batch = int(flags[flags.index("--batch-size") + 1])
    print(f"CIFAR-10 at {data}: {n_train} training, {n_test} test images "
          f"({time.time() - start:.0f} s to extract)", flush=True)
    print(f"MoCo v2 {' '.join(flags)} | baseline vs `{RUNS['asym']}` | "
          f"budget {args.budget:.0f} s\n", flush=True)
    step_s, channels_last = calibrate(flags, args.tiny)
    if channels_last:
        flags = flags + ["--channels-last"]
    steps = n_train // batch
    epochs = args.epochs or choose_epochs(step_s, steps, n_train + n_test, batch, args.budget,
                                          args.max_epochs, args.knn_every)
    every = knn_interval(epochs, args.knn_every)
    estimate = estimate_seconds(epochs, every, step_s, steps, n_train + n_test, batch)
    print(f"\nepochs: {epochs}{' (given)' if args.epochs else ''}, kNN every {every}: {steps} "
          f"steps an epoch x ({' + '.join(f'{1e3 * s:.1f}' for s in step_s.values())}) ms a "
          f"step (baseline + asym), the kNN evaluations and {STARTUP_S} s of start-up make "
          f"about {estimate:.0f} s for both runs; budget {args.budget:.0f} s; "
          f"channels-last: {'yes' if channels_last else 'no'}", flush=True)
    print(PEERS, flush=True)
    done = run_both(data, flags, epochs, every, work, args.workers)
    print("", flush=True)
    for line in side_by_side(work):
        print(line, flush=True)
    for run, (code, seconds) in done.items():
        print(f"{run}: exit code {code}, {seconds:.0f} s", flush=True)
        if code:
            print("".join(open(os.path.join(work, run, "stdout.txt")).readlines()[-5:]), flush=True)
    if args.out:
        try:
            print(f"logs and plot {collect(work, args.out)} in {args.out}", flush=True)
        except ImportError as e:
            print(f"logs in {args.out}; no plot: {e}", flush=True)
    return 1 if any(code for code, _ in done.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
