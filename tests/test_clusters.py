"""Runs that survive clusters (mocov2_asym.py; the other scripts share these lines word for word):
the whole state checked before each save and after each load, stop signals (to the process group,
and to torchrun's agent, which SIGUSR1 kills) that save and let the same command continue exactly,
--save-every, resume checks, errors from any process, a hung process, the output directory's lock
and room, the backbone written before the checkpoint, and the resumed steps marked in the log."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import augment
import mocov2_asym as moco
from conftest import FAST, ROOT, free_port, read_log, run_script, step_losses
from test_e2e import digest, error_line
from test_frameworks import error_line as in_process_error_line

SCRIPT = "mocov2_asym.py"


def folder_args(folder, out, *flags):
    """48 images, batch 8: 6 steps an epoch."""
    return FAST + ["--data", folder, "--batch-size", "8", "--queue-size", "64", "--output-dir", str(out)] + list(flags)


# ---- 1. the whole state, checked before every save and after every load -------------------------
def pieces(args):
    source, target = moco.build_encoders(args, torch.device("cpu"))
    optimizer = moco.make_optimizer(source, args)
    return {"source": source, "target": target, "queue": moco.Queue(args.queue_size, args.dim),
            "optimizer": optimizer, "scaler": torch.amp.GradScaler("cpu", enabled=False)}


def test_save_refuses_a_non_finite_state_and_says_what_is_on_disk(tmp_path):
    args = moco.parse_args(FAST + ["--output-dir", str(tmp_path)])
    state = pieces(args)
    with torch.no_grad():
        state["target"].backbone.bn1.running_var[0] = float("inf")  # a finite loss can hide this
    with pytest.raises(moco.RunFailed, match=r"target\.backbone\.bn1\.running_var.*no checkpoint was written"):
        moco.save_checkpoint(args, 3, 10, state, None)
    assert not os.path.exists(tmp_path / "checkpoint.pth") and not os.path.exists(tmp_path / "backbone.pth")
    with torch.no_grad():
        state["target"].backbone.bn1.running_var[0] = 1.0
    assert moco.save_checkpoint(args, 3, 10, state, None) == 3
    before = digest(tmp_path / "checkpoint.pth"), digest(tmp_path / "backbone.pth")
    for name, tensor in (("queue.keys", state["queue"].keys), ("source.projector.0.bias", state["source"].projector[0].bias)):
        with torch.no_grad():
            tensor.view(-1)[5] = float("nan")
        with pytest.raises(moco.RunFailed, match=rf"{name}.*{tmp_path}/checkpoint.pth holds step 3 \(epoch 0.30\)"):
            moco.save_checkpoint(args, 4, 10, state, None)
        with torch.no_grad():
            tensor.view(-1)[5] = 0.0
    assert (digest(tmp_path / "checkpoint.pth"), digest(tmp_path / "backbone.pth")) == before
    # a checkpoint that holds a non-finite value is refused when loaded, naming it
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    ckpt["optimizer"]["state"] = {0: {"momentum_buffer": torch.full((2,), float("inf"))}}
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(augment.InputError, match=r"non-finite values in 1 tensors \(optimizer\.state\.0\.momentum_buffer\)"):
        moco.read_checkpoint(str(tmp_path / "bad.pth"), args, 10)


# ---- 2. stop signals ------------------------------------------------------------------------------
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
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {out}")


def start(script, args, nproc=1):
    """A run in the background, in a session of its own (as a scheduler's job step)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(ROOT, script)] + args
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", os.path.join(ROOT, script)] + args
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def same_state(a, b):
    ca, cb = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"]
    for part in ("source", "target", "queue"):
        for k, v in ca[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, cb[part][k]), (part, k)
    for i, s in ca["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], cb["optimizer"]["state"][i]["momentum_buffer"]), i


def test_sigterm_to_the_job_saves_and_the_same_command_continues_exactly(folder, tmp_path):
    """SIGTERM to the whole process group (the training process and its data workers, as a scheduler
    sends it): the step finishes, the checkpoint is saved, exit code 3; rerunning the same command
    ends where an uninterrupted run ends, bit for bit."""
    run = folder_args(folder, tmp_path / "parts", "--epochs", "3", "--workers", "1")
    proc = start(SCRIPT, run)
    wait_for_step(tmp_path / "parts", 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == moco.EXIT_STOPPED, stderr
    stopped = int(stderr.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert f"{tmp_path}/parts/checkpoint.pth holds step {stopped} " in stderr
    assert torch.load(tmp_path / "parts" / "checkpoint.pth", weights_only=True)["step"] == stopped
    run_script(SCRIPT, run)
    run_script(SCRIPT, folder_args(folder, tmp_path / "whole", "--epochs", "3", "--workers", "1"))
    same_state(tmp_path / "whole", tmp_path / "parts")
    log = read_log(tmp_path / "parts")
    resumed = [r for r in log if "resumed" in r]
    assert len(resumed) == 1 and resumed[0]["step"] == stopped
    redone = [r["step"] for r in log[log.index(resumed[0]):] if r.get("redo")]
    assert redone == list(range(stopped + 1, resumed[0]["redo_until"] + 1))  # logged before the stop, run again


def test_sigusr1_to_torchrun_two_processes_stop_and_continue_exactly(folder, tmp_path):
    """SIGUSR1 kills torchrun's agent (it does not handle it); its two workers notice that their
    launcher is gone, save and stop instead of training on as orphans; the same command then ends
    where an uninterrupted two-process run ends, bit for bit (mid-epoch: the loaders draw from their
    own generator, not from the RNG of MoCo's BN shuffle)."""
    run = folder_args(folder, tmp_path / "parts", "--epochs", "2", "--workers", "0")
    proc = start(SCRIPT, run, nproc=2)
    wait_for_step(tmp_path / "parts", 2, proc)
    os.kill(proc.pid, signal.SIGUSR1)  # the agent only
    _, stderr = proc.communicate(timeout=180)  # returns once the workers, which share its stderr, are gone too
    assert "stopped by the launcher's exit at step " in stderr, stderr
    stopped = torch.load(tmp_path / "parts" / "checkpoint.pth", weights_only=True)["step"]
    assert 2 <= stopped < 12
    run_script(SCRIPT, run, nproc=2)
    run_script(SCRIPT, folder_args(folder, tmp_path / "whole", "--epochs", "2", "--workers", "0"), nproc=2)
    same_state(tmp_path / "whole", tmp_path / "parts")


def test_loader_leaves_the_global_random_state_alone(folder):
    args = moco.parse_args(folder_args(folder, "unused"))
    train_set = augment.dataset(folder, "train", moco.make_views(args))
    state = torch.get_rng_state()
    next(iter(moco.train_loader(train_set, 0, 2, args)))
    assert torch.equal(state, torch.get_rng_state())


def test_save_every_steps_and_at_epoch_ends(folder, tmp_path, monkeypatch):
    saved = []
    real = moco.save_checkpoint
    monkeypatch.setattr(moco, "save_checkpoint", lambda args, step, *rest: saved.append(step) or real(args, step, *rest))
    moco.main(folder_args(folder, tmp_path, "--save-every", "4", "--epochs", "3", "--max-steps", "13"))
    assert saved == [4, 6, 8, 12, 13]


# ---- 3. resuming changes nothing silently -----------------------------------------------------------
def test_resume_refuses_changed_flags_and_prefers_the_directory_s_own_checkpoint(folder, tmp_path, capsys):
    first = folder_args(folder, tmp_path / "a", "--max-steps", "2")
    moco.main(first)
    line = in_process_error_line(SCRIPT, first[:-2] + ["--max-steps", "3", "--lr", "0.06", "--bn-splits", "2"], capsys)
    assert "changes its run (--lr 0.03 -> 0.06, --bn-splits 1 -> 2); pass --resume-anyway" in line
    moco.main(first[:-2] + ["--max-steps", "3", "--epochs", "3"])  # --epochs may grow, --max-steps change
    assert "--epochs 3 -> 1" in in_process_error_line(SCRIPT, first[:-2] + ["--epochs", "1"], capsys)
    moco.main(first[:-2] + ["--max-steps", "4", "--epochs", "3", "--lr", "0.06", "--resume-anyway"])
    assert torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["step"] == 4
    # --resume PATH starts a new directory from PATH; requeued, it continues from its own checkpoint
    other = folder_args(folder, tmp_path / "b", "--epochs", "3", "--resume", str(tmp_path / "a" / "checkpoint.pth"),
                        "--lr", "0.06")
    moco.main(other + ["--max-steps", "5"])
    moco.main(other + ["--max-steps", "6"])
    resumed = [r["resumed"] for r in read_log(tmp_path / "b") if "resumed" in r]
    assert resumed == [str(tmp_path / "a" / "checkpoint.pth"), str(tmp_path / "b" / "checkpoint.pth")]
    assert "--resume none, but" in in_process_error_line(SCRIPT, first[:-2] + ["--resume", "none"], capsys)


# ---- 5, 6. errors from any process; a hung process ----------------------------------------------------
def test_an_error_on_one_process_is_printed_once_with_its_rank_and_stops_both(tmp_path):
    from conftest import small_image_folder
    root = tmp_path / "data"
    small_image_folder(root, n_train=32, n_test=8)
    (root / "train" / "3" / "broken.png").write_bytes(b"\x89PNG broken")  # in one process's share
    proc = run_script(SCRIPT, FAST + ["--data", str(root), "--max-steps", "3", "--output-dir", str(tmp_path / "run"),
                                      "--no-image-check"], nproc=2, check=False)  # found when its batch is made
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stderr
    assert ours[0].startswith(("error (rank 0): cannot read image", "error (rank 1): cannot read image")) and "broken.png" in ours[0]


def test_a_hung_process_stops_the_others_after_dist_timeout(folder, tmp_path):
    """Rank 1 is stopped (SIGSTOP); rank 0 gives up after --dist-timeout (0.1 min) with one line."""
    port = free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPT)] + folder_args(
            folder, tmp_path, "--epochs", "4", "--dist-timeout", "0.1"), stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    try:
        wait_for_step(tmp_path, 1, procs[0])
        os.kill(procs[1].pid, signal.SIGSTOP)
        began = time.time()
        _, stderr = procs[0].communicate(timeout=120)
        assert procs[0].returncode == 1 and time.time() - began < 60
        assert "error (rank 0): lost contact with the other processes" in stderr and "Traceback" not in stderr
    finally:
        procs[1].kill()
        procs[1].wait()


# ---- 7. every image looked at before any work ---------------------------------------------------------
@pytest.fixture
def broken_folder(tmp_path):
    from conftest import small_image_folder
    root = tmp_path / "data"
    small_image_folder(root, n_train=32, n_test=10)
    (root / "train" / "3" / "broken.png").write_bytes(b"\x89PNG broken")  # 33 training images
    return root


def test_an_unreadable_image_stops_the_run_before_any_work(broken_folder, tmp_path, capsys):
    line = in_process_error_line(SCRIPT, FAST + ["--data", str(broken_folder), "--batch-size", "11", "--queue-size", "66",
                                                 "--output-dir", str(tmp_path / "run")], capsys)
    assert "1 of the 33 training images cannot be read (the first: cannot read image " in line and "broken.png" in line
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")


def test_skip_bad_images_leaves_them_out_instead_of_standing_in_another(broken_folder, tmp_path, monkeypatch):
    """33 files, one unreadable, batch 11: 2 steps an epoch over the 32 readable images (not 3 over
    33 places); the broken file is never loaded during training."""
    loaded = []
    real = augment.load_rgb
    monkeypatch.setattr(augment, "load_rgb", lambda path: loaded.append(str(path)) or real(path))
    moco.main(FAST + ["--data", str(broken_folder), "--batch-size", "11", "--queue-size", "66", "--max-steps", "1",
                      "--skip-bad-images", "--output-dir", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["steps_per_epoch"] == 2
    assert sum("broken.png" in path for path in loaded) == 1  # the check's decode, before training
    dataset = augment.dataset(str(broken_folder), "train", None)
    counted = []
    monkeypatch.setattr(augment.LoadCheck, "__getitem__", lambda self, i: counted.append(i) or (self.indices[i], None))
    augment.check_images(dataset, skip_bad=True)  # the same files: the cached answer, nothing read again
    assert counted == [] and len(dataset) == 32


def test_nothing_readable_is_a_clear_error(tmp_path):
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "a")
        (tmp_path / split / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(augment.InputError, match="--skip-bad-images: none of the 1 images can be read"):
        augment.check_images(augment.dataset(str(tmp_path), "train", None), skip_bad=True)


# ---- 8. the output directory ----------------------------------------------------------------------
def test_one_training_per_output_directory_and_unwritable_ones(folder, tmp_path, capsys):
    args = moco.parse_args(folder_args(folder, tmp_path / "run"))
    lock = moco.lock_output_dir(args)  # another training holds the directory
    try:
        proc = run_script(SCRIPT, folder_args(folder, tmp_path / "run", "--max-steps", "1"), check=False)
        assert f"is in use by pid {os.getpid()} on " in error_line(proc)
    finally:
        lock.close()
    (tmp_path / "file").write_text("")
    assert "cannot write to --output-dir" in in_process_error_line(SCRIPT, folder_args(folder, tmp_path / "file" / "run"), capsys)


def test_a_full_disk_stops_before_training_or_keeps_the_last_checkpoint(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(moco.shutil, "disk_usage", lambda path: type("usage", (), {"free": 10 * 2**20})())
    line = in_process_error_line(SCRIPT, folder_args(folder, tmp_path, "--max-steps", "1"), capsys)
    assert "has 10 MiB free; two checkpoints need" in line and not os.path.exists(tmp_path / "log.jsonl")
    monkeypatch.undo()
    moco.main(folder_args(folder, tmp_path, "--max-steps", "2"))
    before = digest(tmp_path / "checkpoint.pth")
    real = torch.save

    def full(obj, path):
        real(obj, path)
        if "checkpoint.pth" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(moco.torch, "save", full)
    line = in_process_error_line(SCRIPT, folder_args(folder, tmp_path, "--max-steps", "3"), capsys)
    assert f"cannot save to {tmp_path}: No space left on device; {tmp_path}/checkpoint.pth holds step 2 " in line
    assert digest(tmp_path / "checkpoint.pth") == before
    assert sorted(os.listdir(tmp_path)) == ["backbone.pth", "checkpoint.pth", "lock", "log.jsonl"]  # no temporary file left


# ---- 10. the backbone before the checkpoint -------------------------------------------------------
def test_a_kill_between_the_two_files_is_redone_by_the_rerun(folder, tmp_path, monkeypatch):
    run = folder_args(folder, tmp_path, "--epochs", "2")
    moco.main(run + ["--max-steps", "2"])
    real = moco.save_atomic

    def killed_before_the_checkpoint(obj, path):
        if path.endswith("checkpoint.pth"):
            raise SystemExit("killed")
        real(obj, path)
    monkeypatch.setattr(moco, "save_atomic", killed_before_the_checkpoint)
    with pytest.raises(SystemExit):
        moco.main(run + ["--max-steps", "4"])
    monkeypatch.undo()
    backbone = torch.load(tmp_path / "backbone.pth", weights_only=True)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 2 and not torch.equal(backbone["conv1.weight"], ckpt["source"]["backbone.conv1.weight"])
    moco.main(run + ["--max-steps", "5"])
    backbone = torch.load(tmp_path / "backbone.pth", weights_only=True)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 5 and torch.equal(backbone["conv1.weight"], ckpt["source"]["backbone.conv1.weight"])
    log = read_log(tmp_path)
    assert [(r["step"], r.get("redo", False)) for r in log if "loss" in r] == [
        (1, False), (2, False), (3, False), (4, False), (3, True), (4, True), (5, False)]
