"""Runs that survive clusters (mocov2_asym.py; the other scripts share these lines word for word):
kill -9 of a process at any moment and stop signals (to the process group, and to torchrun with
--signals-to-handle) leave a whole checkpoint from which the same command continues bit for bit,
one process and two; two torchrun agents train as one agent with two processes; a process that
raises, dies or hangs stops the job; nothing non-finite is saved; the files are the user's;
resuming refuses another run; every image is looked at before any work."""
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

import augment
import mocov2_asym as moco
from conftest import FAST, ROOT, free_port, read_log, run_in_processes, run_script, step_losses
from test_frameworks import error_line as in_process_error_line

SCRIPT = "mocov2_asym.py"


def folder_args(folder, out, *flags):
    """48 images, batch 8: 6 steps an epoch; 2 epochs."""
    return FAST + ["--data", folder, "--batch-size", "8", "--queue-size", "64", "--epochs", "2",
                   "--output-dir", str(out)] + list(flags)


def same_state(a, b):
    """The checkpoints of two output directories hold the same step and bitwise the same state."""
    ca, cb = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"]
    for part in ("source", "target", "queue"):
        for k, v in ca[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, cb[part][k]), (part, k)
    for i, s in ca["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], cb["optimizer"]["state"][i]["momentum_buffer"]), i
    for name in ("backbone.pth", "checkpoint.pth"):
        assert not os.path.exists(a / (name + ".tmp")) and not os.path.exists(b / (name + ".tmp"))


@pytest.fixture(scope="module")
def whole(folder, tmp_path_factory):
    """Uninterrupted runs to compare with: one process and two."""
    out = tmp_path_factory.mktemp("whole")
    moco.main(folder_args(folder, out / "one"))
    run_in_processes(SCRIPT, [folder_args(folder, out / "two")])
    return out


def start(args, nproc=1, torchrun=()):
    """A run in the background, in a session of its own (as a scheduler's job step)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(ROOT, SCRIPT)] + args
    if nproc > 1 or torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               *(torchrun or ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]),
               os.path.join(ROOT, SCRIPT)] + args
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, start_new_session=True)


def wait_for_step(out, step, proc, timeout=240):
    """Until the log of a running process shows `step`."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            if max(step_losses(out), default=0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {out}")


# ---- 1. kill -9 and stop signals: a whole checkpoint, the same command continues exactly -----------
def test_sigterm_saves_the_step_and_the_same_command_continues_exactly(folder, whole, tmp_path):
    """One process, data workers: SIGTERM to its process group (the step finishes, the checkpoint
    is saved, exit code 3, one line), then the same command to the end: bitwise the uninterrupted
    run's state."""
    run = folder_args(folder, tmp_path, "--workers", "1")
    proc = start(run)
    wait_for_step(tmp_path, 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == augment.EXIT_STOPPED, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    stopped = int(lines[-1].split("stopped at step ")[1].split(" ")[0])
    assert len(lines) == 1 and lines[0] == (f"stopped at step {stopped} by SIGTERM: {tmp_path}/"
                                            f"checkpoint.pth holds it; the same command continues")
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == stopped and ckpt["evaluated"] == (stopped % 6 != 0)  # 6 steps an epoch
    moco.main(run)  # the same command, in this process
    same_state(whole / "one", tmp_path)
    resumed = [r["step"] for r in read_log(tmp_path) if "resumed" in r]
    assert resumed == [stopped]


def test_torchrun_kill_9_and_sigusr1_two_processes_continue_exactly(folder, whole, tmp_path):
    """Two processes under torchrun, a save every other step: kill -9 of one worker at any moment (mid-
    step, mid-save): torchrun stops the job (exit code 1, ChildFailedError) and the checkpoint
    loads; then SIGUSR1 to the agent, which forwards it (--signals-to-handle): both processes save
    the same step and stop; the same command then ends where the uninterrupted two-process run
    ends, bit for bit."""
    run = folder_args(folder, tmp_path, "--workers", "0", "--save-every", "2")
    signals = ["--signals-to-handle", "SIGTERM,SIGUSR1", "--master-addr=127.0.0.1"]
    proc = start(run, 2, signals + [f"--master-port={free_port()}"])
    wait_for_step(tmp_path, 4, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)  # a process dies: the job stops
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "ChildFailedError" in stderr and "rank      :" in stderr
    killed = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"]
    assert killed >= 2  # step 2 was saved before step 4 was logged
    proc = start(run, 2, signals + [f"--master-port={free_port()}"])  # 30 s to save and stop
    wait_for_step(tmp_path, killed + 2, proc)
    os.kill(proc.pid, signal.SIGUSR1)  # the agent only: it forwards the signal to its workers
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1, stderr  # torchrun's own: it re-raises the signal it forwarded
    stopped = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"]
    assert f"stopped at step {stopped} by SIGUSR1: {tmp_path}/checkpoint.pth holds it" in stderr
    assert stderr.count("stopped at step") == 1 and "SignalException" in stderr
    run_in_processes(SCRIPT, [run])  # the same command, in two processes as torchrun makes them
    same_state(whole / "two", tmp_path)


def test_two_torchrun_agents_train_as_one_agent_with_two_processes(folder, whole, tmp_path):
    """The multi-node path: two agents (one process each) meet by c10d rendezvous on 127.0.0.1."""
    port = free_port()
    agents = [start(folder_args(folder, tmp_path, "--workers", "0"), 1,
                    ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                     "--rdzv-id=two-agents"]) for _ in range(2)]
    for agent in agents:
        _, stderr = agent.communicate(timeout=300)
        assert agent.returncode == 0, stderr
    same_state(whole / "two", tmp_path)


# ---- 2. a process that raises, dies or hangs stops the job ----------------------------------------
def test_a_hung_process_stops_the_job(folder, tmp_path):
    """SIGSTOP of one worker: the other gives up after --dist-timeout (0.1 min) and torchrun stops
    the job, naming the rank. (A process that dies: the kill -9 test above; one that raises: the
    next test.) torchrun kills a worker that ignores its SIGTERM 30 s later (on a worker's failure
    torch 2.14 does not apply --shutdown-timeout): the test does that kill at once."""
    out = tmp_path / "run"
    proc = start(folder_args(folder, out, "--dist-timeout", "0.1", "--epochs", "20"), 2,
                 ["--master-addr=127.0.0.1", f"--master-port={free_port()}"])
    wait_for_step(out, 2, proc)
    hung = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()[-1])
    os.kill(hung, signal.SIGSTOP)
    began, stderr, gave_up = time.time(), [], None
    watchdog = threading.Timer(120, os.killpg, (proc.pid, signal.SIGKILL))  # a hung test ends too
    watchdog.start()
    for line in proc.stderr:
        stderr.append(line)
        if f"Sending process {hung} closing signal SIGTERM" in line:
            gave_up = time.time() - began  # the other worker timed out and torchrun stops the job
            os.kill(hung, signal.SIGKILL)
    proc.wait()
    watchdog.cancel()
    stderr = "".join(stderr)
    assert proc.returncode == 1 and gave_up is not None and gave_up < 30, stderr
    assert "Timed out waiting 6000ms" in stderr and "ChildFailedError" in stderr
    assert "rank      : 0" in stderr and "rank      : 1" in stderr


def test_an_error_on_one_process_shows_its_rank_and_stops_both(tmp_path):
    from conftest import small_image_folder
    root = tmp_path / "data"
    small_image_folder(root, n_train=32, n_test=8)
    (root / "train" / "3" / "broken.png").write_bytes(b"\x89PNG broken")  # in one process's share
    proc = run_script(SCRIPT, FAST + ["--data", str(root), "--max-steps", "3", "--no-image-check",
                                      "--output-dir", str(tmp_path / "run")], nproc=2, check=False)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 1 and len(ours) == 1, proc.stderr  # found when its batch is made
    assert ours[0].startswith(("error (rank 0): cannot read image", "error (rank 1): cannot read "
                               "image")) and "broken.png" in ours[0]


def test_bad_input_under_torchrun_is_one_line_before_anything_else(tmp_path):
    proc = run_script(SCRIPT, FAST + ["--batch-size", "15", "--queue-size", "60", "--output-dir",
                                      str(tmp_path)], nproc=2, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines[0] == ("error: --batch-size 15 is not divisible by the "
                                                 "2 processes"), proc.stderr
    assert proc.stderr.count("error:") == 1 and "exitcode  : 2" in proc.stderr
    assert not os.path.exists(tmp_path / "log.jsonl") or not read_log(tmp_path)


# ---- 3. checkpoints: finite, whole, the user's; resumed only into the same run ---------------------
def pieces(args):
    source, target = moco.build_encoders(args, torch.device("cpu"))
    return {"source": source, "target": target, "queue": moco.Queue(args.queue_size, args.dim),
            "optimizer": moco.make_optimizer(source, args),
            "scaler": torch.amp.GradScaler("cpu", enabled=False)}


def test_saves_are_finite_whole_and_the_users(tmp_path, monkeypatch, capsys):
    """A non-finite tensor is never written; a save that fails midway (a full disk, a kill) leaves
    the last whole checkpoint, and the next save leaves no stray file; files get the umask's mode."""
    args = moco.parse_args(FAST + ["--output-dir", str(tmp_path)])
    state = pieces(args)
    old_umask = os.umask(0o022)
    try:
        moco.save_checkpoint(args, 3, 10, state)
    finally:
        os.umask(old_umask)
    for name in ("checkpoint.pth", "backbone.pth"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with torch.no_grad():
        state["target"].backbone.bn1.running_var[0] = float("inf")  # a finite loss can hide this
    with pytest.raises(SystemExit) as exit_info:
        moco.save_checkpoint(args, 4, 10, state)
    assert exit_info.value.code == 1
    assert "non-finite values in target.backbone.bn1.running_var" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    with torch.no_grad():
        state["target"].backbone.bn1.running_var[0] = 1.0
    real = torch.save

    def dies_midway(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        moco.save_checkpoint(args, 5, 10, state)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    monkeypatch.setattr(torch, "save", real)
    moco.save_checkpoint(args, 6, 10, state)
    assert sorted(os.listdir(tmp_path)) == ["backbone.pth", "checkpoint.pth"]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 6


def test_resume_refuses_another_run_and_foreign_files(folder, tmp_path, capsys):
    first = folder_args(folder, tmp_path / "a", "--max-steps", "2")
    moco.main(first)
    changed = first[:-2] + ["--max-steps", "3", "--lr", "0.06", "--bn-splits", "2"]
    assert ("changes its run (--lr 0.03 -> 0.06, --bn-splits 1 -> 2); --resume-anyway if that is "
            "intended") in in_process_error_line(SCRIPT, changed, capsys)
    moco.main(first[:-2] + ["--max-steps", "3", "--epochs", "3"])  # --epochs, --max-steps may change
    moco.main(changed + ["--resume-anyway"])
    assert torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["step"] == 3
    out = ["--output-dir", str(tmp_path / "b")]
    backbone = str(tmp_path / "a" / "backbone.pth")
    assert (f"cannot resume from {backbone}: not a checkpoint.pth of a training run (backbone.pth "
            f"holds the backbone only)") in in_process_error_line(SCRIPT, first + ["--resume",
                                                                                   backbone] + out,
                                                                  capsys)
    import byol_asym
    assert "it holds a mocov2 run; continue it with mocov2_asym.py" in in_process_error_line(
        "byol_asym.py", FAST[:-2] + ["--resume", str(tmp_path / "a" / "checkpoint.pth")] + out, capsys)
    assert byol_asym.FRAMEWORK == "byol" and not (tmp_path / "b" / "checkpoint.pth").exists()
    # --resume PATH starts a new directory from PATH; requeued, it continues from its own checkpoint
    other = first[:-2] + ["--resume", str(tmp_path / "a" / "checkpoint.pth"), "--epochs", "3"] + out
    moco.main(other + ["--max-steps", "4"])
    moco.main(other + ["--max-steps", "5"])
    resumed = [r["resumed"] for r in read_log(tmp_path / "b") if "resumed" in r]
    assert resumed == [str(tmp_path / "a" / "checkpoint.pth"), str(tmp_path / "b" / "checkpoint.pth")]


def test_save_every_steps_and_at_epoch_ends(folder, tmp_path, monkeypatch):
    saved = []
    real = moco.save_checkpoint
    monkeypatch.setattr(moco, "save_checkpoint",
                        lambda args, step, *rest: saved.append(step) or real(args, step, *rest))
    moco.main(folder_args(folder, tmp_path, "--save-every", "4", "--epochs", "3", "--max-steps", "13"))
    assert saved == [4, 6, 8, 12, 13]


def test_loader_leaves_the_global_random_state_alone(folder):
    args = moco.parse_args(folder_args(folder, "unused"))
    train_set = augment.dataset(folder, "train", moco.make_views(args))
    state = torch.get_rng_state()
    next(iter(moco.train_loader(train_set, 0, 2, args)))
    assert torch.equal(state, torch.get_rng_state())


# ---- 4. every image looked at before any work -----------------------------------------------------
@pytest.fixture
def broken_folder(tmp_path):
    from conftest import small_image_folder
    root = tmp_path / "data"
    small_image_folder(root, n_train=32, n_test=10)
    (root / "train" / "3" / "broken.png").write_bytes(b"\x89PNG broken")  # 33 training images
    return root


def test_an_unreadable_image_stops_the_run_before_any_work(broken_folder, tmp_path, capsys):
    line = in_process_error_line(SCRIPT, FAST + ["--data", str(broken_folder), "--batch-size", "11",
                                                 "--queue-size", "66", "--output-dir",
                                                 str(tmp_path / "run")], capsys)
    assert "1 of the 33 training images cannot be read (the first: cannot read image " in line
    assert "broken.png" in line and not read_log(tmp_path / "run")


def test_skip_bad_images_leaves_them_out_instead_of_standing_in_another(broken_folder, tmp_path,
                                                                        monkeypatch):
    """33 files, one unreadable, batch 11: 2 steps an epoch over the 32 readable images (not 3 over
    33 places); the broken file is read once, by the check, never during training."""
    loaded = []
    real = augment.load_rgb
    monkeypatch.setattr(augment, "load_rgb", lambda path: loaded.append(str(path)) or real(path))
    moco.main(FAST + ["--data", str(broken_folder), "--batch-size", "11", "--queue-size", "66",
                      "--max-steps", "1", "--skip-bad-images", "--output-dir", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["steps_per_epoch"] == 2
    assert sum("broken.png" in path for path in loaded) == 1


def test_nothing_readable_is_a_clear_error(tmp_path):
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "a")
        (tmp_path / split / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(augment.InputError, match="--skip-bad-images: none of the 1 images can be read"):
        augment.check_images({"images": augment.dataset(str(tmp_path), "train", None)}, skip_bad=True)
