"""The benchmarks in smoke mode (one tiny configuration each, a few seconds): what they count is
checked, never how fast anything is."""
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import CIFAR_TAR, ROOT

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


def test_dataloader_upscales_the_cifar_copy(tmp_path):
    if not os.path.exists(CIFAR_TAR):
        pytest.skip(f"{CIFAR_TAR} not present")
    root = dataloader.upscaled_cifar(CIFAR_TAR, 12, 64, str(tmp_path))
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, "train")) for f in names]
    from PIL import Image
    assert len(files) == 12 and all(Image.open(f).size == (64, 64) for f in files)
