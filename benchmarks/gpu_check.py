"""What only a GPU measures (speed, memory, CIFAR-10 in minutes), in one run of about 8 minutes that
always returns what it measured: every part runs under its own `timeout`, the parts run in order of value, each row is
printed (and written) the moment it is measured, and everything goes to one markdown file named
at the start, so a run killed at any point still returns all rows before it.

    bash benchmarks/gpu_check.sh --out "$OUT"                 # one GPU: about 8 minutes (--budget 480)
    bash benchmarks/gpu_check.sh --out "$OUT" --parts c f      # the parts a first run had no time for
    bash benchmarks/gpu_check.sh --cpu-smoke --out /tmp/kit   # every part for seconds on the CPU (the test suite's run)

Parts, in the order they run (--parts takes any subset, in this order):
    a  smoke: every script for a few steps under torchrun (NCCL on a GPU) with the designs, --gpu-aug
       and --data-on-device, all at once; then lincls.py, variance.py and transfer.py on the MoCo v2
       checkpoint; a row per command with its exit code
    e  CIFAR-10: MoCo v2 baseline vs --multicrop --asym-bn --mean-enc 2, the same epochs, chosen from
       the measured step times to fit about 4 minutes (benchmarks/cifar_compare.py); kNN rows as they come
    b  the step of each design of MoCo v2 at 224 px, ResNet-50, bf16 (benchmarks/throughput.py): images/s,
       ratio to the baseline, FLOPs and their share of peak, setup and warm-up seconds, host syncs per step
    d  data loading per worker at 224 px and at 32 px with all the machine's cores (benchmarks/dataloader.py),
       and the views made on the device
    c  the baseline and the composition of the five other frameworks (ResNet-50, 224 px, bf16)
    f  torch.compile for the CIFAR step (inductor; and CUDA graphs: --compile-mode reduce-overhead)

The results file (gpu_check.md), the full output (gpu_check.log), part e's two logs and its plot go
to --out (default $OUT, else runs/gpu_check); runs and checkpoints stay in --work-dir (a temporary
directory by default), never in --out. The CIFAR-10 JPEG tarball is looked for at --cifar-tar, else
at data/ and shared/data/ (cifar10-jpg.tar.gz); without it parts d and e use the
built-in synthetic shapes and say so.
"""
import argparse
import datetime
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import cifar_compare  # noqa: E402  (after the path; it imports no torch)

ORDER = "aebdcf"
TITLES = {"a": "smoke: every script and evaluation tool", "e": "CIFAR-10: baseline vs --multicrop --asym-bn --mean-enc 2",
          "b": "MoCo v2: the step of each design", "d": "data loading per worker",
          "c": "the five other frameworks: baseline and composition", "f": "torch.compile and CUDA graphs for the CIFAR step"}
LIMITS = {"a": 60, "e": 280, "b": 100, "d": 60, "c": 90, "f": 120}  # seconds per part on a GPU (the budget caps them)
SMOKE_LIMITS = dict.fromkeys(ORDER, 240)  # generous: the suite's machine may be shared
COMPOSITION = "--multicrop --asym-bn --mean-enc 2"
TAR_NAME = "cifar10-jpg.tar.gz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="what only a GPU measures, every row returned as it is measured",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"),
                   help="results directory ($OUT where set)")
    p.add_argument("--parts", nargs="+", default=list(ORDER), choices=list(ORDER),
                   help="parts to run, always in the order aebdcf: " + "; ".join(f"{k} {TITLES[k]}" for k in ORDER))
    p.add_argument("--budget", type=float, default=480,
                   help="seconds for all parts together; a part gets what is left, at most its own limit")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="every part for seconds on the CPU (no GPU used even where there is one)")
    p.add_argument("--cifar-tar", help=f"the CIFAR-10 JPEG tarball (default: {TAR_NAME} in data or shared/data)")
    p.add_argument("--work-dir", help="runs and checkpoints (default: a new temporary directory, removed at the end)")
    args = p.parse_args(argv)
    args.parts = [part for part in ORDER if part in args.parts]
    if not args.cifar_tar:
        candidates = [os.path.join(ROOT, d, TAR_NAME) for d in ("data", "shared/data")]
        args.cifar_tar = next((c for c in candidates if os.path.exists(c)), None)
    elif not os.path.exists(args.cifar_tar):
        p.error(f"--cifar-tar {args.cifar_tar}: no such file")
    return args


def shown(cmd):
    """A command as README would write it: python, and paths inside the repository relative to it."""
    return shlex.join("python" if c == sys.executable else os.path.relpath(c, ROOT) if c.startswith(ROOT + os.sep) else c
                      for c in cmd)


class Kit:
    """The results file, the log, the clock and the children: each command runs under `timeout` (its
    whole process group is killed at the limit) and only this process's own children are waited for."""

    def __init__(self, args):
        self.args, self.smoke = args, args.cpu_smoke
        os.makedirs(args.out, exist_ok=True)
        self.results_path = os.path.join(args.out, "gpu_check.md")
        self.results = open(self.results_path, "w")
        self.log = open(os.path.join(args.out, "gpu_check.log"), "w")
        self.work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
        os.makedirs(self.work, exist_ok=True)
        self.start = time.time()
        self.part_end = self.start
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.smoke:  # the CPU, one thread per process: several run at once on few cores
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")

    def emit(self, line="", results=True):
        """A line to stdout, the log and (unless results=False) the results file, flushed at once."""
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()
        if results:
            self.results.write(line + "\n")
            self.results.flush()

    def left(self):
        """Seconds left to this part: its limit and the whole run's budget."""
        return min(self.part_end, self.start + self.args.budget) - time.time()

    def python(self, script, *args):
        return [sys.executable, os.path.join(ROOT, script), *map(str, args)]

    def timed(self, cmd, limit=None):
        limit = max(1, int(min(limit or 1e9, self.left())))
        return ["timeout", "-k", "5", str(limit), *cmd], limit

    def run(self, cmd, limit=None):
        """Run cmd, streaming its output; table lines and notes go to the results too -> exit code."""
        self.emit(f"`{shown(cmd)}`\n")
        full, limit = self.timed(cmd, limit)
        start, tail = time.time(), []
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                cwd=ROOT, env=self.env)
        for line in proc.stdout:
            line = line.rstrip("\n")
            noise = line.startswith((" ", "\t", "Traceback")) or "Warning" in line or "warn(" in line
            self.emit(line, results=not noise)
            tail = (tail + [line])[-6:]
        code = proc.wait()
        self.finished(code, time.time() - start, limit, tail)
        return code

    def finished(self, code, seconds, limit, tail):
        if code in (124, 137):
            self.emit(f"\n**killed at its time limit ({limit} s)**; the rows above are all it measured\n")
        elif code:
            self.emit(f"\n**exit code {code}** after {seconds:.0f} s; its last lines:\n")
            self.emit("```\n" + "\n".join(tail) + "\n```")
        else:
            self.emit(f"\n({seconds:.0f} s)\n")

    def run_together(self, commands, limit=None):
        """Several commands at once, each under `timeout`, a row per command as it ends -> {name: exit code}."""
        procs, codes = {}, {}
        for name, cmd in commands:
            full, _ = self.timed(cmd, limit)
            out = open(os.path.join(self.work, name.replace(" ", "_").replace("/", "_") + ".txt"), "w")
            procs[name] = (subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env),
                           out, time.time(), cmd)
        while len(codes) < len(procs):
            time.sleep(0.5)
            for name, (proc, out, start, cmd) in procs.items():
                if name in codes or proc.poll() is None:
                    continue
                codes[name] = proc.returncode
                out.close()
                lines = [line.strip() for line in open(out.name, errors="replace") if line.strip()]
                last = (lines[-1] if lines else "")[:160].replace("|", "/")
                status = "killed at the limit" if proc.returncode in (124, 137) else str(proc.returncode)
                self.emit(f"| {name} | {status} | {time.time() - start:.0f} | {last} |")
                self.log.write(f"{shown(cmd)}\n" + "".join(line + "\n" for line in lines[-30:]))
        return codes

    def part(self, key, function):
        limit = (SMOKE_LIMITS if self.smoke else LIMITS)[key]
        budget_left = self.start + self.args.budget - time.time()
        if budget_left < 10:
            self.emit(f"\n## ({key}) {TITLES[key]}\n\nskipped: {budget_left:.0f} s of the budget left\n")
            return
        self.part_end = time.time() + min(limit, budget_left)
        self.emit(f"\n## ({key}) {TITLES[key]}\n\n(at {time.time() - self.start:.0f} s; at most {self.left():.0f} s)\n")
        start = time.time()
        try:
            function(self)
        except Exception as e:  # a broken part must not cost the parts after it
            self.emit(f"\n**part failed**: {type(e).__name__}: {e}\n")
        self.emit(f"part ({key}): {time.time() - start:.0f} s\n")


def machine(kit):
    """The header: time, command, GPU, CPUs, versions, commit."""
    kit.emit(f"# GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    kit.emit(f"- command: `{shlex.join(sys.argv)}`; results: {kit.results_path}")
    gpu = "none"
    if shutil.which("nvidia-smi") and not kit.smoke:
        query = subprocess.run(["timeout", "20", "nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True)
        gpu = query.stdout.strip() or query.stderr.strip()[:200]
    versions = ", ".join(f"{name} {installed(name)}" for name in ("torch", "torchvision", "numpy", "pillow"))
    try:  # the GPU machine's copy of the tree may have no .git, or no git
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    kit.emit(f"- GPU: {gpu}; CPUs: {os.cpu_count()}; python {sys.version.split()[0]}, {versions}; commit {commit or '?'}")
    kit.emit(f"- mode: {'CPU smoke' if kit.smoke else 'GPU'}; parts {' '.join(kit.args.parts)}; budget {kit.args.budget:.0f} s; "
             f"CIFAR-10: {kit.args.cifar_tar or 'not found (synthetic shapes instead)'}; work dir {kit.work}")


def installed(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def small_folder(kit):
    """A small ImageFolder with train/ and test/ for the evaluation tools: 20 (smoke: 10) CIFAR-10 images
    a class, or the built-in shapes without the tarball."""
    if not kit.args.cifar_tar:
        return synthetic_folder(kit)
    folder = os.path.join(kit.work, "cifar_small")
    return folder if os.path.isdir(folder) else cifar_compare.extract_cifar(kit.args.cifar_tar, folder, 10 if kit.smoke else 20)


def synthetic_folder(kit):
    """An ImageFolder of the built-in shapes (train 600, test 100), for part e without the CIFAR-10
    tarball; made by a child process (no torch in this one)."""
    folder = os.path.join(kit.work, "shapes")
    if not os.path.isdir(folder):
        code = ("import os, sys, augment\n"
                "for split, n in (('train', 600), ('test', 100)):\n"
                "    shapes = augment.SyntheticShapes(split)\n"
                "    for i in range(n):\n"
                "        image, label = shapes[i]\n"
                "        os.makedirs(os.path.join(sys.argv[1], split, str(label)), exist_ok=True)\n"
                "        image.save(os.path.join(sys.argv[1], split, str(label), f'{i}.png'))\n")
        subprocess.run(["timeout", "120", sys.executable, "-c", code, folder], cwd=ROOT, env=kit.env, check=True)
    return folder


# ---- the parts -----------------------------------------------------------------------------------
SMALL_HEADS = {  # the CPU smoke's small projectors (as tests/test_frameworks.py)
    "mocov2_asym.py": ["--queue-size", "64"], "byol_asym.py": ["--dim", "32", "--mlp-dim", "64"],
    "mocov3_asym.py": ["--dim", "32", "--mlp-dim", "64"], "simsiam_asym.py": ["--dim", "32", "--proj-dim", "64", "--pred-dim", "16"],
    "simclr_asym.py": ["--dim", "16", "--mlp-dim", "32"], "barlow_asym.py": ["--projector", "32-32-32"],
}


def part_smoke(kit):
    """Every script with the designs at once (torchrun, NCCL, on a GPU), then the evaluation tools."""
    if kit.smoke:
        base = ["--data", "synthetic", "--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0",
                "--max-steps", "1", "--print-freq", "1", "--knn-every", "-1"]
        launch = lambda script: kit.python(script)  # noqa: E731
        vit = ["--arch", "vit_small", "--patch-size", "16"]
    else:
        base = ["--data", "synthetic", "--arch", "resnet18", "--image-size", "64", "--batch-size", "64", "--workers", "2",
                "--max-steps", "20", "--print-freq", "10", "--knn-every", "-1"]
        launch = lambda script: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",  # noqa: E731
                                 os.path.join(ROOT, script)]
        vit = ["--arch", "vit_small", "--image-size", "224", "--batch-size", "32"]
    designs = COMPOSITION.split() + ["--gpu-aug"]
    fp16 = [] if kit.smoke else ["--amp", "fp16"]  # GradScaler's path: CUDA only
    runs = [("mocov2 composition", "mocov2_asym.py", designs),
            ("mocov2 scalemix asym-aug", "mocov2_asym.py", ["--scalemix", "--asym-aug", "--channels-last"] + fp16),
            ("mocov2 data-on-device", "mocov2_asym.py", ["--data-on-device", "--cifar-stem", "--scalemix"] + COMPOSITION.split()),
            ("mocov3 resnet18", "mocov3_asym.py", designs), ("mocov3 vit_small", "mocov3_asym.py", vit + designs),
            ("byol", "byol_asym.py", designs), ("simsiam", "simsiam_asym.py", designs),
            ("simclr scalemix", "simclr_asym.py", designs + ["--scalemix"]),
            ("barlow asym-aug", "barlow_asym.py", designs + ["--asym-aug"])]
    if kit.smoke:  # the kit's plumbing, in seconds (tests/test_frameworks.py runs every script and design on the CPU)
        runs = [run for run in runs if run[0] in ("mocov2 composition", "mocov2 data-on-device", "mocov3 vit_small")]
    out = {name: os.path.join(kit.work, "smoke", name.replace(" ", "_")) for name, _, _ in runs}
    kit.emit("| command | exit code | seconds | last line |\n|---|---|---|---|")
    codes = kit.run_together([(name, launch(script) + base + (SMALL_HEADS[script] if kit.smoke else []) + extra
                               + ["--output-dir", out[name]]) for name, script, extra in runs])
    checkpoint = os.path.join(out["mocov2 composition"], "checkpoint.pth")
    if codes["mocov2 composition"] or not os.path.exists(checkpoint):
        kit.emit("\nno MoCo v2 checkpoint: the evaluation tools did not run")
        return
    size, steps, workers = ("32", "2", "0") if kit.smoke else ("64", "20", "2")
    folder = small_folder(kit)
    kit.run_together([
        ("lincls.py", kit.python("lincls.py", "--pretrained", checkpoint, "--data", folder, "--image-size", size,
                                 "--batch-size", "64", "--epochs", "1", "--max-steps", steps, "--workers", workers,
                                 "--output-dir", os.path.join(kit.work, "lincls"))),
        ("variance.py", kit.python("variance.py", "--checkpoint", checkpoint, "--data", folder, "--num-images", "32",
                                   "--views", "4", "--batch-size", "16", "--workers", workers, "--collapse",
                                   "--output-dir", os.path.join(kit.work, "variance"))),
        ("transfer.py", kit.python("transfer.py", "--pretrained", os.path.join(out["mocov2 composition"], "backbone.pth"),
                                   "--arch", "resnet18", "--dataset", "folder", "--data", folder, "--image-size", size,
                                   "--lambdas", "5", "--max-iter", "50", "--workers", workers,
                                   "--cache-dir", os.path.join(kit.work, "transfer_cache"),
                                   "--output-dir", os.path.join(kit.work, "transfer")))])


def part_cifar(kit):
    """benchmarks/cifar_compare.py in the time left; then its logs and plot into --out, even if it was killed."""
    work = os.path.join(kit.work, "cifar")
    data = ["--cifar-tar", kit.args.cifar_tar] if kit.args.cifar_tar else ["--data", synthetic_folder(kit)]
    if not kit.args.cifar_tar:
        kit.emit("no CIFAR-10 tarball: the built-in synthetic shapes instead (the machinery, not the claim)\n")
    if kit.smoke:
        extra = ["--tiny", "--per-class", "10", "--budget", "20", "--max-epochs", "1", "--workers", "1"]
    else:  # the runs' budget: the part's time less extracting (about 5 s), timing the steps (about 25 s) and a margin
        extra = ["--budget", str(int(min(220, kit.left() - 60)))]
    kit.run(kit.python("benchmarks/cifar_compare.py", *data, *extra, "--work-dir", work))
    try:
        plot = cifar_compare.collect(work, kit.args.out)
        kit.emit(f"logs{' and ' + os.path.basename(plot) if plot else ''} in {kit.args.out}")
    except ImportError as e:
        kit.emit(f"logs in {kit.args.out}; no plot: {e}")


def part_designs(kit):
    if kit.smoke:
        timing = ["--steps", "1", "--repeats", "1", "--warmup", "1"]
        compare = ["", "--multicrop", COMPOSITION, "--gpu-aug"]
        flags = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--queue-size", "64"]
    else:
        timing = ["--steps", "10", "--repeats", "3", "--warmup", "3"]
        compare = ["", "--multicrop", "--multicrop --multicrop-per-crop", "--scalemix", "--asym-bn", "--mean-enc 2",
                   COMPOSITION, "--gpu-aug", f"{COMPOSITION} --gpu-aug", "--channels-last", "--amp off"]
        flags = ["--arch", "resnet50", "--image-size", "224", "--batch-size", "128"]
    kit.run(kit.python("benchmarks/throughput.py", "mocov2_asym.py", *timing, "--compare", *compare, "--", *flags))


def part_frameworks(kit):
    """One throughput.py per framework, each under its own timeout (a fifth of the part's time at least)."""
    scripts = ["mocov3_asym.py", "byol_asym.py", "simsiam_asym.py", "simclr_asym.py", "barlow_asym.py"]
    if kit.smoke:  # the plumbing: two of them
        scripts = ["mocov3_asym.py", "barlow_asym.py"]
    for i, script in enumerate(scripts):
        if kit.smoke:
            timing = ["--steps", "1", "--repeats", "1", "--warmup", "1"]
            flags = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8"] + SMALL_HEADS[script]
        else:
            timing = ["--steps", "5", "--repeats", "3", "--warmup", "3"]
            flags = ["--arch", "resnet50", "--image-size", "224", "--batch-size", "128"]
        kit.run(kit.python("benchmarks/throughput.py", script, *timing, "--compare", "", COMPOSITION, "--", *flags),
                limit=max(kit.left() / (len(scripts) - i), 20))


def part_data(kit):
    cores = os.cpu_count() or 1
    source = ["--cifar-tar", kit.args.cifar_tar] if kit.args.cifar_tar else ["--data", "synthetic"]
    if kit.smoke:
        large = ["--upscale", "128", "--image-size", "96", "--images", "32", "--batch-size", "16", "--workers", "1"]
        small = ["--upscale", "0", "--image-size", "32", "--images", "64", "--batch-size", "32", "--workers", "1"]
    else:
        large = ["--upscale", "256", "--image-size", "224", "--images", "2048", "--batch-size", "64", "--workers", "1", str(cores)]
        small = ["--upscale", "0", "--image-size", "32", "--images", "8192", "--batch-size", "256", "--workers", "1", str(cores)]
    if not kit.args.cifar_tar:  # the synthetic shapes are 64 px: no upscaling to choose
        large, small = (flags[2:] for flags in (large, small))
    kit.run(kit.python("benchmarks/dataloader.py", *source, *large, "--recipes", "baseline", "multicrop", "--gpu-aug"))
    kit.run(kit.python("benchmarks/dataloader.py", *source, *small, "--recipes", "baseline", "multicrop", "meanenc",
                       "--data-on-device"))


def part_compile(kit):
    if kit.smoke:
        timing, flags = ["--steps", "1", "--repeats", "1", "--warmup", "1"], cifar_compare.TINY
        kit.run(kit.python("benchmarks/throughput.py", "mocov2_asym.py", *timing, "--no-flops", "--compare", "",
                           "--compile eager", "--", *flags))
        return
    timing, flags = ["--steps", "10", "--repeats", "2", "--warmup", "5"], cifar_compare.RECIPE
    kit.run(kit.python("benchmarks/throughput.py", "mocov2_asym.py", *timing, "--no-flops", "--compare", "", "--compile",
                       "--", *flags))
    kit.run(kit.python("benchmarks/throughput.py", "mocov2_asym.py", *timing, "--no-flops", "--compile-mode", "reduce-overhead",
                       "--compare", "--compile", "--", *flags))


PARTS = {"a": part_smoke, "e": part_cifar, "b": part_designs, "d": part_data, "c": part_frameworks, "f": part_compile}


def main(argv=None):
    args = parse_args(argv)
    kit = Kit(args)
    print(f"results: {kit.results_path}", flush=True)
    try:
        machine(kit)
    except Exception as e:  # the header must not cost the parts
        kit.emit(f"- (header incomplete: {type(e).__name__}: {e})")
    for key in args.parts:
        kit.part(key, PARTS[key])
    kit.emit(f"\ndone in {time.time() - kit.start:.0f} s")
    if not args.work_dir:
        shutil.rmtree(kit.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
