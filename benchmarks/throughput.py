"""Training-step throughput of any *_asym.py script, design by design.

Times the training step alone: forward of source and target, loss, backward, optimizer step and
target update (and MoCo v2's enqueue; with --gpu-aug, also the views' colour operations, and with
--data-on-device the making of every view from uint8 images on the device, which then belong to
the step), on ready tensors already on the device, after warm-up; several repeats, median and
spread. Reports images/s, step time, peak memory, and the achieved FLOP/s
(torch.utils.flop_counter) with its share of the device's peak where the peak is known, and the
FLOPs relative to the first configuration beside its time relative to the first; how long
building the model and the batch took (setup) and the warm-up steps (cuDNN autotuning, compiling);
and on CUDA the host-device synchronisations one step makes (torch.cuda.set_sync_debug_mode): 0
means the host never waits for the GPU inside the step. Each configuration's row is printed the
moment it is measured. --compare runs several configurations in one process and prints each step
time relative to the first: on a shared machine only ratios measured together are stable.

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
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment  # noqa: E402  (after the path)

# dense peak FLOP/s per device name fragment: (bf16/fp16 tensor cores, fp32 without TF32)
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "L40S": (362e12, 91.6e12), "A10G": (70e12, 31.2e12), "V100": (125e12, 15.7e12)}
DISTINCT_IMAGES = 8  # the ready batch repeats the views of this many images: the step's cost does not depend on them


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
    p.add_argument("--compile-mode", help="torch.compile mode for configurations with --compile (e.g. reduce-overhead: "
                                          "CUDA graphs; max-autotune-no-cudagraphs); default: torch's")
    argv = list(sys.argv[1:] if argv is None else argv)
    compare = None
    if "--compare" in argv:  # its entries start with "--" themselves: take them by hand, up to
        i = argv.index("--compare")  # "--" or one of this tool's own options
        own = {"--", "--steps", "--warmup", "--repeats", "--no-flops", "--compile-mode"}
        j = next((k for k in range(i + 1, len(argv)) if argv[k] in own), len(argv))
        compare, argv = argv[i + 1:j], argv[:i] + argv[j:]
    args, script_argv = p.parse_known_args(argv)
    args.compare = compare or args.compare
    args.script_argv = [a for a in script_argv if a != "--"]
    return args


def ready_batch(mod, args, device):
    """One global batch of views from `synthetic` (the views of DISTINCT_IMAGES images, repeated), moved
    to the device: uint8 views and their parameters under --gpu-aug, as the data workers deliver them."""
    data = augment.dataset("synthetic", "train", mod.make_views(args), seed=args.seed)
    samples = [data[i] for i in range(min(DISTINCT_IMAGES, args.batch_size))]
    batch, _ = augment.collate_views([samples[i % len(samples)] for i in range(args.batch_size)])
    return {k: v.to(device) for k, v in batch.items()}


def device_batches(mod, args, device):
    """--data-on-device: -> a function that makes each step's views on the device, as the training loop's
    OnDevice.batches does, from random uint8 images of --image-size px (CIFAR's images are its views' size)."""
    views = augment.DeviceViews(mod.make_views(args))
    n = max(4 * args.batch_size, 256)
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8).to(device)
    index = torch.randperm(n)[:args.batch_size].to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    return lambda: views(images, index, generator)


def build(script, flags, device, compile_mode=None):
    """The script's own pieces, as its train() builds them on one process -> a step function."""
    mod = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    args = mod.parse_args(flags)
    source, target = mod.build_encoders(args, device)
    queue = mod.Queue(args.queue_size, args.dim).to(device) if hasattr(mod, "Queue") else None
    optimizer = mod.make_optimizer(source, args)
    for group in optimizer.param_groups:
        group["lr"] = args.lr * args.batch_size / 256
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ema = getattr(args, "ema", 0.0)  # the clone frameworks copy (m = 0): the same work
    if args.data_on_device:
        next_batch = device_batches(mod, args, device)
    else:
        batch = ready_batch(mod, args, device)
        next_batch = lambda: augment.finish_views(batch)  # noqa: E731  (the identity without --gpu-aug)
    source_forward, target_forward = source, target
    if args.compile:  # as the script's --compile: compiled forwards, the same weights
        options = {"mode": compile_mode} if compile_mode else {}
        source_forward, target_forward = (torch.compile(m, backend=args.compile, **options) for m in (source, target))

    def step():
        views = next_batch()
        if args.channels_last:
            views = {k: v.contiguous(memory_format=torch.channels_last) for k, v in views.items()}
        with augment.autocast(device, args.amp):
            if queue is None:
                loss = mod.train_step(source_forward, target_forward, views, args)[0]
            else:
                loss, _, _, keys = mod.train_step(source_forward, target_forward, queue, views, args)
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


def count_syncs(step, device):
    """Host-device synchronisations in one step (CUDA; else None), by torch.cuda.set_sync_debug_mode's warnings."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(step, device, bench):
    """-> step times in seconds (median, spread) over the repeats, the warm-up's seconds, the FLOPs of
    one step and its host-device synchronisations."""
    start = time.perf_counter()
    for _ in range(bench.warmup):
        step()
    sync(device)
    warmup = time.perf_counter() - start
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
    return statistics.median(times), max(times) - min(times), warmup, flops, count_syncs(step, device)


def device_peak(device, amp):
    """Dense peak FLOP/s of this device at this precision, where known; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (low, fp32) in PEAK_FLOPS.items():
        if fragment in name:
            return low if amp in ("bf16", "fp16") else fp32
    return None


def measure_config(extra, bench, device):
    """One configuration -> its row (a dict), or a row with "error" when it failed (out of memory, a compiler error)."""
    label = extra or "(base)"
    try:
        start = time.perf_counter()
        step, args = build(bench.script, bench.script_argv + shlex.split(extra), device, bench.compile_mode)
        sync(device)
        setup = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        median, spread, warmup, flops, syncs = measure(step, device, bench)
    except (augment.InputError, SystemExit):  # bad flags: one error line
        raise
    except Exception as e:  # the other configurations still run
        return {"config": label, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
    finally:
        step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: the process's peak RSS so far
    peak = device_peak(device, args.amp)
    return {"config": label, "images_per_s": args.batch_size / median, "step_ms": 1e3 * median,
            "spread_ms": 1e3 * spread, "memory_gib": memory / 2**30, "gflop_per_step": flops / 1e9,
            "tflop_per_s": flops / median / 1e12, "peak_share": flops / median / peak if peak and flops else None,
            "setup_s": setup, "warmup_s": warmup, "syncs": syncs}


def print_header(bench, device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    memory = "peak GiB" if device.type == "cuda" else "RSS GiB"
    print(f"{bench.script} {' '.join(bench.script_argv)} | {name} | torch {torch.__version__} | "
          f"{bench.repeats} x {bench.steps} steps after {bench.warmup} warm-up", flush=True)
    print(f"| config | images/s | step ms (spread) | step time / first | FLOPs / first | {memory} | GFLOP/step | TFLOP/s | "
          f"of peak | setup s | warm-up s | syncs/step |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)


def print_row(r):
    if "error" in r:
        print(f"| `{r['config']}` | failed: {r['error']} | | | | | | | | | | |", flush=True)
        return
    share = f"{100 * r['peak_share']:.0f}%" if r["peak_share"] else "-"
    ratio = f"{r['time_ratio']:.2f}x" if r.get("time_ratio") else "-"
    flop_ratio = f"{r['flop_ratio']:.2f}x" if r.get("flop_ratio") else "-"
    syncs = "-" if r["syncs"] is None else r["syncs"]
    print(f"| `{r['config']}` | {r['images_per_s']:.1f} | {r['step_ms']:.1f} ({r['spread_ms']:.1f}) | {ratio} | {flop_ratio} | "
          f"{r['memory_gib']:.2f} | {r['gflop_per_step']:.1f} | {r['tflop_per_s']:.2f} | {share} | {r['setup_s']:.1f} | "
          f"{r['warmup_s']:.1f} | {syncs} |", flush=True)


def run(bench):
    """Every configuration, each row printed as soon as it is measured -> the rows, the device."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    importlib.import_module(os.path.splitext(os.path.basename(bench.script))[0])  # a missing script: before any work
    print_header(bench, device)
    rows, first = [], None
    for extra in bench.compare:
        row = measure_config(extra, bench, device)
        if "error" not in row:
            first = first or row
            row["ratio"] = first["step_ms"] / row["step_ms"]  # throughput relative to the first
            row["time_ratio"] = row["step_ms"] / first["step_ms"]
            row["flop_ratio"] = row["gflop_per_step"] / first["gflop_per_step"] if first["gflop_per_step"] else None
        print_row(row)
        rows.append(row)
    return rows, device


def main(argv=None):
    bench = parse_args(argv)
    try:
        rows, _ = run(bench)
    except (augment.InputError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()) else 0)
