"""Training-step throughput of any *_asym.py script, design by design.

Times the training step alone: forward of source and target, loss, backward, optimizer step and
target update (and MoCo v2's enqueue; with --gpu-aug, also the views' colour operations, which
then belong to the step), on ready tensors already on the device, after warm-up;
several repeats, median and spread. Reports images/s, step time, peak memory, and the achieved
FLOP/s (torch.utils.flop_counter) with its share of the device's peak where the peak is known.
--compare runs several configurations in one process and prints ratios to the first: on a
shared machine only ratios measured together are stable.

    python benchmarks/throughput.py byol_asym.py --arch resnet18 --image-size 32 --batch-size 64
    python benchmarks/throughput.py mocov2_asym.py --compare "" "--multicrop" "--mean-enc 2" "--multicrop --asym-bn --mean-enc 2" \\
        -- --arch resnet50 --image-size 224 --batch-size 128
    python benchmarks/throughput.py simsiam_asym.py --compare "" "--amp off" "--channels-last" -- --batch-size 256

Everything after the script name that this tool does not know (or everything after `--`) goes
to the script's own parser; each --compare entry adds its flags to those.
"""
import argparse
import importlib
import os
import resource
import shlex
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment  # noqa: E402  (after the path)

# dense peak FLOP/s per device name fragment: (bf16/fp16 tensor cores, fp32 without TF32)
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "L40S": (362e12, 91.6e12), "A10G": (70e12, 31.2e12), "V100": (125e12, 15.7e12)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="training-step throughput of an *_asym.py script",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("script", help="one of the six scripts, e.g. byol_asym.py")
    p.add_argument("--compare", nargs="+", default=[""], metavar="FLAGS",
                   help='configurations to time, each a string of script flags ("" = the base flags alone); '
                        'end the list with -- when script flags follow')
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cudnn autotuning, allocator, compile)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median and the spread (max - min) are reported")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step under FlopCounterMode)")
    argv = list(sys.argv[1:] if argv is None else argv)
    compare = None
    if "--compare" in argv:  # its entries start with "--" themselves: take them by hand, up to
        i = argv.index("--compare")  # "--" or one of this tool's own options
        own = {"--", "--steps", "--warmup", "--repeats", "--no-flops"}
        j = next((k for k in range(i + 1, len(argv)) if argv[k] in own), len(argv))
        compare, argv = argv[i + 1:j], argv[:i] + argv[j:]
    args, script_argv = p.parse_known_args(argv)
    args.compare = compare or args.compare
    args.script_argv = [a for a in script_argv if a != "--"]
    return args


def ready_batch(mod, args, device):
    """One global batch of views from `synthetic`, built once and moved to the device (uint8 views
    and their parameters under --gpu-aug, as the data workers deliver them)."""
    data = augment.dataset("synthetic", "train", mod.make_views(args), seed=args.seed)
    batch, _ = augment.collate_views([data[i % len(data)] for i in range(args.batch_size)])
    return {k: v.to(device) for k, v in batch.items()}


def build(script, flags, device):
    """The script's own pieces, as its train() builds them on one process -> a step function."""
    mod = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    args = mod.parse_args(flags)
    if args.amp == "auto":
        args.amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    source, target = mod.build_encoders(args, device)
    queue = mod.Queue(args.queue_size, args.dim).to(device) if hasattr(mod, "Queue") else None
    optimizer = mod.make_optimizer(source, args)
    for group in optimizer.param_groups:
        group["lr"] = args.lr * args.batch_size / 256
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ema = getattr(args, "ema", 0.0)  # the clone frameworks copy (m = 0): the same work
    batch = ready_batch(mod, args, device)
    source_forward, target_forward = source, target
    if args.compile:  # as the script's --compile: compiled forwards, the same weights
        source_forward, target_forward = (torch.compile(m, backend=args.compile) for m in (source, target))

    def step():
        views = augment.finish_views(batch)  # the identity without --gpu-aug
        if args.channels_last:
            views = {k: v.contiguous(memory_format=torch.channels_last) for k, v in views.items()}
        with mod.autocast(device, args):
            if queue is None:
                loss = mod.train_step(source_forward, target_forward, views, args)[0]
            else:
                loss, _, keys = mod.train_step(source_forward, target_forward, queue, views, args)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        mod.momentum_update(target, source, ema)
        if queue is not None:
            queue.dequeue_and_enqueue(keys)
        return loss

    return step, args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device, bench):
    """-> step times in seconds (median, spread) over the repeats, and the FLOPs of one step."""
    for _ in range(bench.warmup):
        step()
    sync(device)
    times = []
    for _ in range(bench.repeats):
        start = time.perf_counter()
        for _ in range(bench.steps):
            step()
        sync(device)
        times.append((time.perf_counter() - start) / bench.steps)
    flops = 0
    if not bench.no_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    return statistics.median(times), max(times) - min(times), flops


def device_peak(device, amp):
    """Dense peak FLOP/s of this device at this precision, where known; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (low, fp32) in PEAK_FLOPS.items():
        if fragment in name:
            return low if amp in ("bf16", "fp16") else fp32
    return None


def run(bench):
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    rows = []
    for extra in bench.compare:
        flags = bench.script_argv + shlex.split(extra)
        step, args = build(bench.script, flags, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        median, spread, flops = measure(step, device, bench)
        memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: the process's peak RSS so far
        peak = device_peak(device, args.amp)
        rows.append({"config": extra or "(base)", "images_per_s": args.batch_size / median, "step_ms": 1e3 * median,
                     "spread_ms": 1e3 * spread, "memory_gib": memory / 2**30, "gflop_per_step": flops / 1e9,
                     "tflop_per_s": flops / median / 1e12, "peak_share": flops / median / peak if peak and flops else None})
        del step
    for row in rows:
        row["ratio"] = rows[0]["step_ms"] / row["step_ms"]  # throughput relative to the first
        row["time_ratio"] = row["step_ms"] / rows[0]["step_ms"]
    return rows, device


def print_table(bench, rows, device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    memory = "peak GiB" if device.type == "cuda" else "RSS GiB"
    print(f"{bench.script} {' '.join(bench.script_argv)} | {name} | torch {torch.__version__} | "
          f"{bench.repeats} x {bench.steps} steps after {bench.warmup} warm-up")
    print(f"| config | images/s | step ms (spread) | step time / first | {memory} | GFLOP/step | TFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['peak_share']:.0f}%" if r["peak_share"] else "-"
        print(f"| `{r['config']}` | {r['images_per_s']:.1f} | {r['step_ms']:.1f} ({r['spread_ms']:.1f}) | "
              f"{r['time_ratio']:.2f}x | {r['memory_gib']:.2f} | {r['gflop_per_step']:.1f} | {r['tflop_per_s']:.2f} | {share} |")


def main(argv=None):
    bench = parse_args(argv)
    try:
        rows, device = run(bench)
    except (augment.InputError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(bench, rows, device)
    return rows


if __name__ == "__main__":
    main()
