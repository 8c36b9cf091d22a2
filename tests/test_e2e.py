"""mocov2_asym.py end to end: resume == uninterrupted with data workers, the saved backbone in
torchvision, the first run's own lines, NaN handling, one clear error line for bad input, real CIFAR-10 images
and the skip reason without them. (tests/test_clusters.py runs it under torchrun.)"""
import hashlib
import re
import math
import os
import tarfile

import pytest
import torch
import torchvision

import augment
import mocov2_asym
from conftest import FAST, read_log, run_script, sigterm_in_step, small_image_folder, step_losses
from test_frameworks import error_line as in_process_error_line

SCRIPT = "mocov2_asym.py"


def main_fails(argv, capsys):
    """mocov2_asym.main(argv) in this process (no interpreter start-up: the command line itself is
    run by the other tests here) -> (exit status, stderr lines other than warnings)."""
    with pytest.raises(SystemExit) as exit_info:
        mocov2_asym.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exit_info.value.code, [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]


def in_process_error(argv, capsys):
    """The one error line of a refused command (exit status 2), run in this process."""
    code, lines = main_fails(argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    return lines[0]


def test_resume_equals_uninterrupted(folder, tmp_path):
    """3 steps an epoch; stop mid-epoch (2), at an epoch's end (3) and resume: the same losses
    and weights as one run, also with another number of data workers (which draw --gpu-aug's
    colour parameters)."""
    common = FAST + ["--data", folder, "--epochs", "3", "--mean-enc", "2", "--scalemix", "--bn-splits", "2", "--gpu-aug"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    mocov2_asym.main(common + ["--max-steps", "7", "--output-dir", str(whole)])
    for stop in ("2", "3", "7"):
        mocov2_asym.main(common + ["--max-steps", stop, "--workers", "1", "--output-dir", str(parts)])
    assert [r["resumed"] for r in read_log(parts) if "resumed" in r] == [str(parts / "checkpoint.pth")] * 2
    a, b = step_losses(whole), step_losses(parts)
    assert sorted(a) == sorted(b) == list(range(1, 8))
    assert all(a[s] == b[s] for s in a), (a, b)
    ca = torch.load(whole / "checkpoint.pth", weights_only=True)
    cb = torch.load(parts / "checkpoint.pth", weights_only=True)
    for key in ("source", "target", "queue"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key] if isinstance(ca[key][k], torch.Tensor))
    net = torchvision.models.resnet18()  # the backbone file: torchvision's keys, the source's weights
    result = net.load_state_dict(torch.load(whole / "backbone.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(net.layer4[1].conv2.weight, ca["source"]["backbone.layer4.1.conv2.weight"])


def test_a_stop_at_an_epoch_s_end_leaves_its_evaluations_to_the_resume(folder, tmp_path, monkeypatch,
                                                                       capsys):
    """SIGTERM in the last step of epoch 1, then in the last step of the run (3 steps an epoch):
    each time the checkpoint is saved at once, marked as owing its evaluations; the same command
    makes them first. The kNN and variances per epoch then equal an uninterrupted run's, the end
    line is printed, and only a fourth run says there is nothing to do."""
    argv = FAST + ["--data", folder, "--knn-every", "1", "--variance-images", "16",
                   "--variance-views", "2"]
    mocov2_asym.main(argv + ["--output-dir", str(tmp_path / "whole")])
    parts = tmp_path / "parts"
    for stop_in in (3, 6):
        sigterm_in_step(monkeypatch, mocov2_asym, stop_in)
        code, _ = main_fails(argv + ["--output-dir", str(parts)], capsys)
        monkeypatch.undo()
        ckpt = torch.load(parts / "checkpoint.pth", weights_only=True)
        assert code == augment.EXIT_STOPPED and ckpt["step"] == stop_in and not ckpt["evaluated"]
        assert not [r for r in read_log(parts) if r.get("step") == stop_in and "knn_top1" in r]
    mocov2_asym.main(argv + ["--output-dir", str(parts)])
    assert capsys.readouterr().out.splitlines()[-1].startswith("finished at step 6: ")
    assert torch.load(parts / "checkpoint.pth", weights_only=True)["evaluated"]
    evaluations = lambda out: {(r["step"], k): r[k] for r in read_log(out)  # noqa: E731
                               for k in ("knn_top1", "v_source", "v_target") if k in r}
    assert evaluations(parts) == evaluations(tmp_path / "whole")
    assert len(evaluations(parts)) == 3 * 3  # steps 0, 3 and 6, each once
    mocov2_asym.main(argv + ["--output-dir", str(parts)])
    assert capsys.readouterr().out.strip() == (f"already finished at step 6: {parts}/checkpoint.pth; "
                                               f"nothing to do")


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, capsys):
    args = FAST + ["--data", folder, "--batch-size", "8", "--output-dir", str(tmp_path)]  # 6 steps an epoch
    mocov2_asym.main(args + ["--max-steps", "2"])
    before = digest(tmp_path / "checkpoint.pth")
    code, lines = main_fails(args + ["--lr", "1e30", "--max-steps", "5", "--resume-anyway"], capsys)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("error: training diverged at step") and lines[0].endswith("; the last checkpoint is kept")
    assert digest(tmp_path / "checkpoint.pth") == before
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["source"].values() if v.is_floating_point())


def error_line(proc):
    """The one error line; warning lines (e.g. a class with no test images) may come before it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_bad_input_is_one_error_line(tmp_path, capsys):
    """MoCo v2's own checks (in this process; tests/test_frameworks.py has the common ones) and,
    once, the command line itself."""
    for args, message in ((["--queue-size", "50"], "not a multiple of the 16 keys"),
                          (["--queue-size", "48", "--sym"], "not a multiple of the 32 keys"),
                          (["--arch", "vgg16"], "not a torchvision ResNet"),
                          (["--resume", "/nonexistent/checkpoint.pth"], "no such file")):
        assert message in in_process_error_line(SCRIPT, FAST + args + ["--output-dir", str(tmp_path)], capsys)
    proc = run_script(SCRIPT, FAST + ["--data", "/nonexistent/images", "--output-dir", str(tmp_path)], check=False)
    assert "no such directory" in error_line(proc)
    assert not os.path.exists(tmp_path / "checkpoint.pth")


def test_wrong_or_corrupt_checkpoint_is_refused(folder, tmp_path, capsys):
    mocov2_asym.main(FAST + ["--data", folder, "--max-steps", "1", "--output-dir", str(tmp_path / "r18")])
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    for resume, arch, message in ((tmp_path / "junk.pth", "resnet18", "cannot read"),
                                  (tmp_path / "r18" / "checkpoint.pth", "resnet34", "--arch resnet18 -> resnet34")):
        assert message in in_process_error(FAST + ["--data", folder, "--arch", arch, "--resume", str(resume),
                                                   "--output-dir", str(tmp_path / "new")], capsys)
    assert not os.path.exists(tmp_path / "new" / "checkpoint.pth")
    # the same flags on a data set that has grown since: another number of steps per epoch
    data = small_image_folder(tmp_path / "data", n_train=32, n_test=8)
    run = FAST + ["--data", data, "--max-steps", "1", "--output-dir", str(tmp_path / "grown")]
    mocov2_asym.main(run)
    before = digest(tmp_path / "grown" / "checkpoint.pth")
    small_image_folder(tmp_path / "data", n_train=48, n_test=8)
    assert "2 steps per epoch, this run 3 (other data?)" in in_process_error(run, capsys)
    assert digest(tmp_path / "grown" / "checkpoint.pth") == before


def test_corrupt_image_names_the_file_or_is_skipped(tmp_path, capsys):
    root = tmp_path / "data"
    small_image_folder(root, n_train=32, n_test=8)
    (root / "train" / "3" / "broken.png").write_bytes(b"\x89PNG broken")
    args = FAST + ["--data", str(root), "--max-steps", "2", "--output-dir", str(tmp_path / "run")]
    assert "broken.png" in in_process_error(args + ["--batch-size", "32", "--queue-size", "64"], capsys)
    mocov2_asym.main(args + ["--skip-bad-images"])
    assert len(step_losses(tmp_path / "run")) == 2


def test_real_cifar10_images(cifar10, tmp_path):
    data = tmp_path / "data"  # 20 training and 10 test images a class: the kNN's forwards dominate
    for split, n in (("train", 20), ("test", 10)):
        for cls in sorted(os.listdir(os.path.join(cifar10, split))):
            os.makedirs(data / split / cls)
            for name in sorted(os.listdir(os.path.join(cifar10, split, cls)))[:n]:
                os.symlink(os.path.join(cifar10, split, cls, name), data / split / cls / name)
    mocov2_asym.main(FAST + ["--data", str(data), "--cifar-stem", "--max-steps", "2", "--knn-every", "0",
                             "--asym-aug", "--multicrop", "2", "--variance-images", "16", "--variance-views", "2",
                             "--output-dir", str(tmp_path / "run")])
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    knn = [r["knn_top1"] for r in log if "knn_top1" in r]
    assert len(knn) == 1 and 0 <= knn[0] <= 100
    monitor = [r for r in log if "v_source" in r]  # at the end, on 16 real test images
    assert [r["step"] for r in monitor] == [2] and 0 < monitor[0]["v_source"] < monitor[0]["v_uniform_source"]


def test_cifar10_skip_says_what_to_set(tmp_path, monkeypatch):
    """The real-data tests' skip reason: the variable unset (CI's copy absent too) or set to
    something unusable, with its value and what it should name; never CI's place."""
    import conftest
    monkeypatch.setattr(conftest, "CIFAR10_CI", str(tmp_path / "ci" / "cifar10-jpg.tar.gz"))
    what = "set it to a CIFAR-10 ImageFolder root with train/ and test/, or a .tar.gz of one"
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv("ASYM_SIAM_CIFAR10", raising=False)
        else:
            monkeypatch.setenv("ASYM_SIAM_CIFAR10", unset)
        assert conftest.no_cifar10_reason() == f"ASYM_SIAM_CIFAR10 is not set: {what}"
    missing = str(tmp_path / "nowhere")
    monkeypatch.setenv("ASYM_SIAM_CIFAR10", missing)
    assert conftest.no_cifar10_reason() == f"ASYM_SIAM_CIFAR10={missing} does not exist: {what}"
    (tmp_path / "root" / "train").mkdir(parents=True)
    monkeypatch.setenv("ASYM_SIAM_CIFAR10", str(tmp_path / "root"))
    assert conftest.no_cifar10_reason() == (f"ASYM_SIAM_CIFAR10={tmp_path / 'root'} is neither a "
                                            f"folder with train/ and test/ nor a tar archive: {what}")
    (tmp_path / "root" / "test").mkdir()
    assert conftest.no_cifar10_reason() is None and conftest.cifar10_path() == str(tmp_path / "root")
    # unset with CI's copy there: no skip, the copy used
    (tmp_path / "ci").mkdir()
    with tarfile.open(conftest.CIFAR10_CI, "w:gz") as tar:
        tar.add(tmp_path / "root", arcname="cifar10")
    monkeypatch.delenv("ASYM_SIAM_CIFAR10")
    assert conftest.no_cifar10_reason() is None and conftest.cifar10_path() == conftest.CIFAR10_CI


def test_a_first_run_explains_itself(folder, tmp_path, capsys, monkeypatch):
    """A start line (data, images, steps, processes x batch, designs, output), a progress line at
    least every 30 s whatever --print-freq (a clock that moves 31 s a call), an end line with the
    last kNN and variances; the same command again: already finished, nothing trained."""
    class Clock:
        now = 0.0

        @staticmethod
        def time():
            Clock.now += 31
            return Clock.now

    monkeypatch.setattr(mocov2_asym, "time", Clock)
    monkeypatch.setattr(augment, "time", Clock)
    out = str(tmp_path / "run")
    argv = FAST + ["--epochs", "1", "--data", folder, "--print-freq", "100", "--knn-every", "0", "--multicrop", "2",
                   "--asym-bn", "--mean-enc", "2", "--output-dir", out]
    mocov2_asym.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"mocov2 starts: {folder}, 48 training images; 3 steps an epoch, 3 in all; "
                        f"1 process(es) x 16 images a step; source: MultiCrop 2; target: SyncBN, "
                        f"MeanEnc 2; writes {out}")
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split(",")[0] for line in progress] == [f"step {n}/3" for n in range(1, 4)]
    assert re.fullmatch(r"step 1/3, [0-9.]+ images/s, ETA [0-9:]+", progress[0])
    assert " | epoch 1 loss " in progress[2]  # an epoch end: logged
    knn = [r["knn_top1"] for r in read_log(out) if "knn_top1" in r][-1]
    v = [r for r in read_log(out) if "v_source" in r][-1]
    assert lines[-1].startswith(f"finished at step 3: {out}/checkpoint.pth and backbone.pth; "
                                f"kNN top-1 {knn:.1f}%; v_source {v['v_source']:.4g}, "
                                f"v_target {v['v_target']:.4g}; "
                                f"v_target / v_source {v['v_target'] / v['v_source']:.3g}")
    assert "paper's baseline" not in lines[-1]  # the paper reports no variances of its baseline
    records = len(read_log(out))
    mocov2_asym.main(argv)
    assert capsys.readouterr().out.strip() == (f"already finished at step 3: {out}/checkpoint.pth; "
                                               f"nothing to do")
    assert len(read_log(out)) == records
