"""The benchmarks in smoke mode (one tiny configuration each, a few seconds): what they count is
checked, never how fast anything is."""
import json
import os
import re
import subprocess
import tarfile
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import dataloader  # noqa: E402
import throughput  # noqa: E402

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--dim", "16", "--mlp-dim", "32"]
QUICK = ["--steps", "1", "--warmup", "1", "--repeats", "2"]


def test_throughput_counts_what_a_design_adds(capsys):
    """MeanEnc 2 costs exactly one more target forward of the batch: the FLOP difference between
    the two configurations equals the FLOPs of that forward, counted on its own."""
    rows = throughput.main(["byol_asym.py", "--compare", "", "--mean-enc 2"] + QUICK + ["--"] + TINY)  # its options end the list
    out = capsys.readouterr().out
    assert "| `(base)` |" in out and "| `--mean-enc 2` |" in out
    base, mean_enc = rows
    assert base["time_ratio"] == 1.0 and base["images_per_s"] > 0 and mean_enc["step_ms"] > 0
    import byol_asym
    args = byol_asym.parse_args(TINY)
    _, target = byol_asym.build_encoders(args, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        target([torch.zeros(8, 3, 32, 32)])
    assert mean_enc["gflop_per_step"] - base["gflop_per_step"] == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-6)


def test_throughput_runs_the_queue_framework_and_reports_bad_flags(capsys):
    rows = throughput.main(["mocov2_asym.py", "--no-flops"] + QUICK + ["--arch", "resnet18", "--image-size", "32",
                                                                        "--batch-size", "8", "--queue-size", "16"])
    assert len(rows) == 1 and rows[0]["gflop_per_step"] == 0 and rows[0]["images_per_s"] > 0
    with pytest.raises(SystemExit):
        throughput.main(["nonexistent_asym.py"])
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("gpu_aug", [[], ["--gpu-aug"]])
def test_dataloader_counts_every_view_of_each_recipe(folder, gpu_aug):
    """Views per image: 2 (source + target), 3 with MeanEnc 2, 8 with MultiCrop's 6 small crops,
    2 with ScaleMix (whose pairs travel as two views under --gpu-aug and make one)."""
    rows = dataloader.main(["--data", folder, "--images", "24", "--batch-size", "8", "--image-size", "32",
                            "--workers", "0", "--recipes", "decode", "baseline", "meanenc", "multicrop", "scalemix"]
                           + gpu_aug)
    per_image = {r["recipe"]: r["views_per_s"] / r["images_per_s"] for r in rows}
    assert per_image == pytest.approx({"decode": 0, "baseline": 2, "meanenc": 3, "multicrop": 8, "scalemix": 2})
    assert all((r["device_half_images_per_s"] is not None) == (bool(gpu_aug) and r["recipe"] != "decode") for r in rows)


def test_dataloader_upscales_the_cifar_copy(cifar10, tmp_path):
    tar_path = str(tmp_path / "cifar10-jpg.tar.gz")  # the tarball's layout: cifar10/train/<class>/
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(os.path.join(cifar10, "train"), arcname="cifar10/train")
    root = dataloader.upscaled_cifar(tar_path, 12, 64, str(tmp_path / "out"))
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, "train")) for f in names]
    from PIL import Image
    assert len(files) == 12 and all(Image.open(f).size == (64, 64) for f in files)


def test_throughput_prints_each_row_when_it_is_measured(capsys, monkeypatch):
    """The first configuration's row is out before the second is measured; a configuration that fails
    (here an unknown architecture) gets its row and the others still run."""
    seen = []
    measure = throughput.measure_config

    def spy(extra, bench, device):
        seen.append(capsys.readouterr().out)
        return measure(extra, bench, device)
    monkeypatch.setattr(throughput, "measure_config", spy)
    rows = throughput.main(["mocov2_asym.py", "--no-flops", "--compare", "", "--arch nonexistent", "--mean-enc 2"] + QUICK
                           + ["--", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--queue-size", "16"])
    assert "| `(base)` |" in seen[1] and "--arch nonexistent" in seen[2] and "failed: ValueError" in seen[2]
    assert [("error" in r) for r in rows] == [False, True, False] and rows[2]["time_ratio"] > 0
    assert rows[0]["setup_s"] > 0 and rows[0]["warmup_s"] > 0 and rows[0]["syncs"] is None  # syncs: CUDA only


def test_throughput_makes_views_on_the_device_in_the_step():
    """--data-on-device: each step makes its views from uint8 images (the FLOPs of the step are the same)."""
    rows = throughput.main(["mocov2_asym.py", "--compare", "", "--data-on-device"] + QUICK
                           + ["--", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--queue-size", "16"])
    assert rows[1]["gflop_per_step"] >= rows[0]["gflop_per_step"] > 0


def test_dataloader_prints_rows_as_measured_and_times_device_views(folder, capsys, monkeypatch):
    seen = []
    measure = dataloader.measure

    def spy(data, recipe, workers, args):
        seen.append(capsys.readouterr().out)
        return measure(data, recipe, workers, args)
    monkeypatch.setattr(dataloader, "measure", spy)
    rows = dataloader.main(["--data", folder, "--images", "16", "--batch-size", "8", "--image-size", "32", "--workers", "0",
                            "--recipes", "baseline", "stronger", "--data-on-device"])
    assert "| baseline | 0 |" in seen[-1]  # the stronger recipe is measured after baseline's row is out
    assert rows[0]["on_device_images_per_s"] > 0 and rows[1]["on_device_images_per_s"] is None  # RandAugment: workers only
    assert "| stronger | 0 |" in capsys.readouterr().out


def test_cifar_epochs_fit_the_budget():
    """By hand: 2 runs of 0.1 s and 0.3 s a step, 10 steps an epoch, 600 images to evaluate at batch 100:
    a kNN costs 600 x 0.1 / 100 / 4 + 3 = 3.15 s (baseline) and 3.45 s; E epochs with kNN every
    round(E / 5) epochs. E = 21 (every 4: 7 evaluations): 20 + 21 x 10 x 0.4 + 7 x 6.6 = 150.2 s."""
    import cifar_compare
    step_s = {"baseline": 0.1, "asym": 0.3}
    seconds = cifar_compare.estimate_seconds(21, 4, step_s, 10, 600, 100)
    assert seconds == pytest.approx(20 + 21 * 10 * 0.4 + 7 * (3.15 + 3.45))
    assert cifar_compare.choose_epochs(step_s, 10, 600, 100, budget=seconds, max_epochs=200) == 21
    assert cifar_compare.choose_epochs(step_s, 10, 600, 100, budget=seconds - 0.1, max_epochs=200) == 20
    assert cifar_compare.choose_epochs(step_s, 10, 600, 100, budget=1, max_epochs=200) == 1  # never fewer than one
    assert cifar_compare.knn_interval(21) == 4 and cifar_compare.knn_interval(3) == 1 and cifar_compare.knn_interval(9, 2) == 2


def write_log(path, records, broken_tail=False):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        if broken_tail:
            f.write('{"epoch": 3.0, "kn')  # a run killed mid-write


def test_plot_logs_reads_any_numeric_key(tmp_path):
    """Series of any logged key against epochs, a cut last line skipped; the summary's last and best (the
    least loss, the largest accuracy, none for a variance)."""
    import plot_logs
    records = [{"epoch": 0.0, "step": 0, "knn_top1": 10.0}, {"epoch": 0.5, "step": 5, "loss": 8.0, "v_source": 0.3},
               {"resumed": "x", "step": 5}, {"epoch": 1.0, "step": 10, "loss": 7.5, "v_source": float("nan")},
               {"epoch": 1.0, "step": 10, "knn_top1": 25.0}]
    write_log(tmp_path / "a", records, broken_tail=True)
    write_log(tmp_path / "b", [{"epoch": 1.0, "knn_top1": 30.0}])
    log = plot_logs.read_log(str(tmp_path / "a"))
    assert len(log) == 5
    assert plot_logs.series(log, "knn_top1") == [(0.0, 10.0), (1.0, 25.0)]
    assert plot_logs.series(log, "loss") == [(0.5, 8.0), (1.0, 7.5)]
    assert plot_logs.series(log, "v_source") == [(0.5, 0.3)] and plot_logs.series(log, "loss", x="step") == [(5, 8.0), (10, 7.5)]
    lines = plot_logs.summary([str(tmp_path / "a"), str(tmp_path / "b" / "log.jsonl")], ["knn_top1", "loss"])
    assert lines[2] == "| a | knn_top1 | 2 | 1 | 25 | 25 |" and lines[3] == "| a | loss | 2 | 1 | 7.5 | 7.5 |"
    assert lines[4] == "| b | knn_top1 | 1 | 1 | 30 | 30 |" and lines[5] == "| b | loss | 0 | - | - | - |"
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]  # the variance panel by default where a log has the monitor's records
    assert plot_logs.default_keys(runs) == ["knn_top1", "loss", "variance"] and plot_logs.default_keys(runs[1:]) == ["knn_top1", "loss"]
    assert plot_logs.summary(runs[:1], ["variance"])[2:] == ["| a | v_source | 1 | 0.5 | 0.3 | - |", "| a | v_target | 0 | - | - | - |"]


def test_plot_logs_draws_a_png_or_says_what_is_missing(tmp_path, capsys):
    import plot_logs
    write_log(tmp_path / "a", [{"epoch": 0.0, "knn_top1": 10.0}, {"epoch": 1.0, "knn_top1": 20.0, "loss": 3.0}])
    out = tmp_path / "plot.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit) as exit_info:
            plot_logs.main([str(tmp_path / "a"), "--out", str(out)])
        assert exit_info.value.code == 2 and "pip install -r requirements-extra.txt" in capsys.readouterr().err
        pytest.skip("matplotlib is not installed (pip install -r requirements-extra.txt): "
                    "the PNG files are not checked")  # one reason: one summary line
    plot_logs.main([str(tmp_path / "a"), "--keys", "knn_top1", "loss", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_log(tmp_path / "v", [{"epoch": 0.0, "v_source": 3e-3, "v_target": 2e-3}, {"epoch": 1.0, "v_source": 1e-3, "v_target": 5e-4}])
    plot_logs.main([str(tmp_path / "v"), "--out", str(tmp_path / "variance.png")])  # the default keys: knn_top1 loss variance
    assert (tmp_path / "variance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kit_keeps_the_rows_of_a_command_killed_at_its_limit(tmp_path):
    """A command that prints a row and then hangs: its row is in the results, and the kit says it was killed."""
    import gpu_check
    kit = gpu_check.Kit(gpu_check.parse_args(["--cpu-smoke", "--out", str(tmp_path), "--work-dir", str(tmp_path / "work")]))
    kit.part_end = time.time() + 60
    code = kit.run([sys.executable, "-c", "import time; print('| row | 1 |', flush=True); time.sleep(60)"], limit=3)
    text = open(kit.results_path).read()
    assert code == 124 and "| row | 1 |" in text and "killed at its time limit (3 s)" in text


def test_kit_gpu_commands_are_valid_command_lines(tmp_path, monkeypatch):
    """The GPU mode is not run here: every command it would run is parsed by the parser of the tool it
    calls (and each throughput configuration by the script's own), so a wrong flag cannot wait for a GPU."""
    import importlib
    import cifar_compare
    import gpu_check
    commands = []
    kit = gpu_check.Kit(gpu_check.parse_args(["--out", str(tmp_path), "--work-dir", str(tmp_path / "work")]))
    kit.part_end = time.time() + 600

    def together(cmds, limit=None):
        for _, cmd in cmds:
            commands.append(cmd)
            if "--output-dir" in cmd:  # as if it ran: the evaluation tools need the MoCo v2 checkpoint
                out = cmd[cmd.index("--output-dir") + 1]
                os.makedirs(out, exist_ok=True)
                open(os.path.join(out, "checkpoint.pth"), "w").close()
        return {name: 0 for name, _ in cmds}
    monkeypatch.setattr(kit, "run", lambda cmd, limit=None: commands.append(cmd) or 0)
    monkeypatch.setattr(kit, "run_together", together)
    for part in gpu_check.ORDER:
        gpu_check.PARTS[part](kit)
    tools = {}
    for cmd in commands:
        if cmd[1:3] == ["-m", "torch.distributed.run"]:
            cmd = cmd[:1] + cmd[5:]  # python -m torch.distributed.run --standalone --nproc_per_node=1 SCRIPT ...
        name, argv = os.path.basename(cmd[1])[:-3], cmd[2:]
        tools[name] = tools.get(name, 0) + 1
        if name == "throughput":
            bench = throughput.parse_args(argv)
            script = importlib.import_module(bench.script[:-3])
            for extra in bench.compare:
                script.parse_args(bench.script_argv + extra.split())
        elif name in ("dataloader", "cifar_compare"):
            {"dataloader": dataloader, "cifar_compare": cifar_compare}[name].parse_args(argv)
        else:
            importlib.import_module(name).parse_args(argv)
    assert tools == {"mocov2_asym": 3, "mocov3_asym": 2, "byol_asym": 1, "simsiam_asym": 1, "simclr_asym": 1, "barlow_asym": 1,
                     "lincls": 1, "variance": 1, "transfer": 1, "cifar_compare": 1, "throughput": 8, "dataloader": 2}
