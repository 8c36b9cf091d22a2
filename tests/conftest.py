"""Shared helpers: run a script (1 process or torchrun), read its JSON-lines log, the CIFAR-10 copy,
a stand-in encoder (Scale) for the hand-computed steps."""
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment  # noqa: E402  (after the path)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="asym-siam-test-cache-")  # the image checks' cache, per session
# Tiny tensors on a 2-core machine: one thread per process, as the scripts run by run_script get
# (OMP_NUM_THREADS=1), spares every op a wait for the second core (the suite runs about 2x faster).
torch.set_num_threads(1)
CIFAR_TAR = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz")
# small and fast: ImageNet stem at 32 px, no kNN unless a test asks (COMMON: every script's flags)
COMMON = ["--data", "synthetic", "--arch", "resnet18", "--image-size", "32", "--batch-size", "16",
          "--workers", "0", "--print-freq", "1", "--knn-every", "-1", "--epochs", "2"]
FAST = COMMON + ["--queue-size", "64"]  # mocov2_asym.py


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


def run_in_processes(script, argv_list, nproc=2):
    """script's main(argv) for each argv in turn, in `nproc` gloo processes started once, with the
    environment torchrun gives (env:// rendezvous): torchrun's behaviour without its start-up per run."""
    ports = [free_port() for _ in argv_list]
    mp.spawn(_run_main, args=(nproc, script, argv_list, ports), nprocs=nproc, join=True)


def _run_main(rank, nproc, script, argv_list, ports):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1")
    module = importlib.import_module(os.path.splitext(script)[0])
    for argv, port in zip(argv_list, ports):
        os.environ["MASTER_PORT"] = str(port)
        module.main(list(argv))


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


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
    """A small ImageFolder subset (train 50/class, test 20/class) of ../shared's real CIFAR-10."""
    if not os.path.exists(CIFAR_TAR):
        pytest.skip(f"{CIFAR_TAR} not present")
    out = tmp_path_factory.mktemp("cifar10")
    counts = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 4:
                continue
            split, cls = parts[-3], parts[-2]
            key = (split, cls)
            if counts.get(key, 0) >= (50 if split == "train" else 20):
                continue
            counts[key] = counts.get(key, 0) + 1
            os.makedirs(out / split / cls, exist_ok=True)
            with tar.extractfile(member) as src, open(out / split / cls / parts[-1], "wb") as dst:
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
