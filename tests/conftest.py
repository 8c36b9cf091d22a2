"""Shared helpers: run a script (1 process or torchrun), read its JSON-lines log, the CIFAR-10 copy,
a stand-in encoder (Scale) for the hand-computed steps."""
import collections
import importlib
import io
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment  # noqa: E402  (after the path)
# Tiny tensors on a 2-core machine: one thread per process, as the scripts run by run_script get
# (OMP_NUM_THREADS=1), spares every op a wait for the second core (the suite runs about 2x faster).
torch.set_num_threads(1)
# The real-data tests' CIFAR-10: ASYM_SIAM_CIFAR10 names an ImageFolder root (train/<class>/,
# test/<class>/) or a .tar.gz of one; without it, CI's copy beside the repository (a setting for
# CI only: a user's skip message names the variable, not this place); where neither is, they skip.
CIFAR10_CI = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz")
CIFAR10_WHAT = "a CIFAR-10 ImageFolder root with train/ and test/, or a .tar.gz of one"


def cifar10_path():
    """The CIFAR-10 copy to use: ASYM_SIAM_CIFAR10 where set (an empty value counts as unset)."""
    return os.environ.get("ASYM_SIAM_CIFAR10") or CIFAR10_CI


def usable_cifar10(path):
    # an ImageFolder root needs both splits; a file must open as a tar archive
    if os.path.isdir(path):
        return all(os.path.isdir(os.path.join(path, split)) for split in ("train", "test"))
    return os.path.isfile(path) and tarfile.is_tarfile(path)


def no_cifar10_reason():
    """Why the real-data tests skip, None where a usable copy is found: what the user can set."""
    value = os.environ.get("ASYM_SIAM_CIFAR10")
    if not value:
        return None if usable_cifar10(CIFAR10_CI) else \
            f"ASYM_SIAM_CIFAR10 is not set: set it to {CIFAR10_WHAT}"
    if usable_cifar10(value):
        return None
    problem = "does not exist" if not os.path.exists(value) else \
        "is neither a folder with train/ and test/ nor a tar archive"
    return f"ASYM_SIAM_CIFAR10={value} {problem}: set it to {CIFAR10_WHAT}"


def cifar10_files():
    """(split, class, name, open()) of each image of the CIFAR-10 copy, in its stored order."""
    root = cifar10_path()
    if os.path.isdir(root):
        for split in ("train", "test"):
            for cls in sorted(os.listdir(os.path.join(root, split))):
                for name in sorted(os.listdir(os.path.join(root, split, cls))):
                    path = os.path.join(root, split, cls, name)
                    yield split, cls, name, lambda path=path: open(path, "rb")
        return
    with tarfile.open(root) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 4:
                yield parts[-3], parts[-2], parts[-1], lambda m=member: tar.extractfile(m)
# small and fast: ImageNet stem at 32 px, no kNN unless a test asks (COMMON: every script's flags)
COMMON = ["--data", "synthetic", "--arch", "resnet18", "--image-size", "32", "--batch-size", "16",
          "--workers", "0", "--print-freq", "1", "--knn-every", "-1", "--epochs", "2"]
FAST = COMMON + ["--queue-size", "64"]  # mocov2_asym.py


def pytest_configure(config):
    # torchrun's error recorder (the scripts' @record) cannot install its fault handler where
    # pytest captures stderr: harmless here, and not seen on a command line
    config.addinivalue_line("filterwarnings", "ignore:Unable to enable fault handler")


def pytest_terminal_summary(terminalreporter):
    # Why tests were skipped, one line per reason: pytest says nothing by default, and its -rs
    # gives a line per test where a fixture skips (the same reason once per real-CIFAR test).
    reasons = collections.Counter(str(report.longrepr[2]).removeprefix("Skipped: ")
                                  for report in terminalreporter.stats.get("skipped", [])
                                  if isinstance(report.longrepr, tuple))
    if reasons:
        terminalreporter.write_sep("=", "why tests were skipped")
        for reason, n in reasons.items():
            terminalreporter.write_line(f"{n} skipped: {reason}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, args, nproc=1, check=True, timeout=300):
    """Run `script` with `args` in 1 process or under torchrun with gloo; -> CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, script)] + list(args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.join(ROOT, script)] + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class Pool:
    """Two gloo processes started once for the whole session, in which every two-process test runs
    its function: a start of Python, torch and the test modules costs seconds, many times over. A
    job is fn(rank, *args) on each process (fn: a module-level function of a test module or of
    this file); the process group is the job's own (fn starts and ends it, as torchrun's
    processes do), and whatever a failed job leaves behind is cleared before the next one."""

    def __init__(self, n=2):
        context = mp.get_context("spawn")
        self.n, self.outbox = n, context.Queue()
        self.inboxes = [context.Queue() for _ in range(n)]
        self.procs = [context.Process(target=_serve, args=(r, self.inboxes[r], self.outbox),
                                      daemon=True) for r in range(n)]
        for proc in self.procs:
            proc.start()

    def run(self, fn, *args, timeout=600):
        for inbox in self.inboxes:
            inbox.put((fn.__module__, fn.__name__, args))
        results, failures = [None] * self.n, []
        try:
            for i in range(self.n):
                rank, ok, value = self.outbox.get(timeout=timeout if not failures else 30)
                if ok:
                    results[rank] = torch.load(io.BytesIO(value), weights_only=True)
                else:
                    failures.append(f"rank {rank}:\n{value}")
        except queue.Empty:
            failures.append(f"no answer from every process within {timeout} s")
        if failures:
            self.close()  # a process may still wait in a collective: start afresh next time
            raise AssertionError("\n".join(failures))
        return results

    def close(self):
        for proc in self.procs:
            proc.kill()
            proc.join()


_pool = []


def pool():
    """The session's Pool (started at first use, again after a failed job)."""
    if not _pool or not all(proc.is_alive() for proc in _pool[0].procs):
        _pool[:] = [Pool()]
    return _pool[0]


def _serve(rank, inbox, outbox):
    torch.set_num_threads(1)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    while True:
        module, name, args = inbox.get()
        try:
            value = getattr(importlib.import_module(module), name)(rank, *args)
            buffer = io.BytesIO()
            torch.save(value, buffer)
            outbox.put((rank, True, buffer.getvalue()))
        except BaseException:  # SystemExit included: a script that stops is a failed job here
            outbox.put((rank, False, traceback.format_exc()))
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def spawn(fn, *args):
    """fn(rank, *args) in 2 gloo processes (tcp rendezvous, the group started for it) -> each
    rank's return value."""
    return pool().run(_in_group, free_port(), fn.__module__, fn.__name__, args)


def _in_group(rank, port, module, name, args):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2)
    try:
        value = getattr(importlib.import_module(module), name)(rank, *args)
        torch.distributed.barrier()  # rank 0 hosts the store: it must not leave while 1 uses it
        return value
    finally:
        torch.distributed.destroy_process_group()


def run_in_processes(script, argv_list, nproc=2):
    """script's main(argv) for each argv in turn, in the session's two gloo processes, with the
    environment torchrun gives (env:// rendezvous): torchrun's behaviour without its start-up."""
    assert nproc == 2
    pool().run(_run_main, nproc, script, argv_list, [free_port() for _ in argv_list])


def _run_main(rank, nproc, script, argv_list, ports):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1")
    module = importlib.import_module(os.path.splitext(script)[0])
    for argv, port in zip(argv_list, ports):
        os.environ["MASTER_PORT"] = str(port)
        module.main(list(argv))


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def sigterm_in_step(monkeypatch, module, n):
    """Step n (from 1) of `module`'s loop sends SIGTERM to this process, as it asks for its
    learning rate: the loop meets the signal at that step's end, as a scheduler's would come."""
    real = module.learning_rate

    def signalled(step, *rest):
        if step == n - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *rest)
    monkeypatch.setattr(module, "learning_rate", signalled)


def step_losses(output_dir):
    return {r["step"]: r["loss"] for r in read_log(output_dir) if "loss" in r}


def small_image_folder(root, n_train=48, n_test=16):
    """PNG files of the synthetic shapes in ImageFolder layout."""
    for split, n, source in (("train", n_train, augment.SyntheticShapes("train")), ("test", n_test, augment.SyntheticShapes("test"))):
        for i in range(n):
            image, label = source[i]
            os.makedirs(root / split / str(label), exist_ok=True)
            image.save(root / split / str(label) / f"{i}.png")
    return str(root)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return small_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def cifar10(tmp_path_factory):
    """A small ImageFolder subset (train 50/class, test 20/class) of the real CIFAR-10."""
    reason = no_cifar10_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("cifar10")
    counts = {}
    for split, cls, name, read in cifar10_files():
        if counts.get((split, cls), 0) >= (50 if split == "train" else 20):
            continue
        counts[(split, cls)] = counts.get((split, cls), 0) + 1
        os.makedirs(out / split / cls, exist_ok=True)
        with read() as src, open(out / split / cls / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return str(out)


class Scale(nn.Module):
    """A stand-in encoder: flattens each view and multiplies by a fixed matrix (projector), then
    by another (predictor) on the source: outputs are easy to compute by hand."""

    def __init__(self, predictor):
        super().__init__()
        self.projector = nn.Linear(4, 3, bias=False)
        self.predictor = nn.Linear(3, 3, bias=False) if predictor else nn.Identity()
        torch.nn.init.normal_(self.projector.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.normal_(self.predictor.weight, generator=torch.Generator().manual_seed(1)) if predictor else None

    def forward(self, views):
        return [self.predictor(self.projector(x.flatten(1))) for x in views]
