"""The scripts' variance monitor (the paper's v_source and v_target while it trains): each side's
variance against a hand computation on a stand-in encoder (train-mode BN per forward, MeanEnc's
mean, MultiCrop's crops pooled, the predictor left out), its BN batches, the monitor's log == what
variance.py --sides reports for the checkpoint, 2 processes == 1 process, and a run with the
monitor == the same run without it (bitwise)."""
import argparse
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import mocov2_asym as moco
import simsiam_asym as simsiam
import variance
from conftest import read_log, step_losses
from test_distributed import spawn


# ---------------------------------------------------------------------------------------------
# The measurement by hand
# ---------------------------------------------------------------------------------------------
class StandIn(nn.Module):
    """backbone: a view's mean colour (Nx3); projector: a fixed 3->4 matrix and BN without affine
    (train mode: each forward's own statistics); predictor (source only): a fixed 4->4 matrix."""

    def __init__(self, seed, predictor):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.projector = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4, affine=False))
        self.projector[0].weight.data = torch.randn(4, 3, generator=g)
        self.predictor = nn.Linear(4, 4, bias=False) if predictor else nn.Identity()

    def forward(self, views):
        return [self.predictor(self.projector(self.backbone(x))) for x in views]


def by_hand(views, weight):
    """One forward of the stand-in's projector by hand (float64): the mean colour of each view times
    the matrix, normalised by this forward's own mean and population variance (BN, eps 1e-5)."""
    h = views.double().mean((2, 3)) @ weight.double().T
    return (h - h.mean(0)) / (h.var(0, unbiased=False) + 1e-5).sqrt()


def variance_of(encodings):
    """A list of K encodings (D) of one image -> mean over dimensions of their population variance
    after l2-normalisation, by a loop."""
    units = [e / e.norm() for e in encodings]
    mean = sum(units) / len(units)
    return sum(sum((u[c] - mean[c]) ** 2 for u in units) / len(units) for c in range(len(mean))).item() / len(mean)


def simsiam_std_of(rows):
    """SimSiam's std x sqrt(d) of NxD encodings over the N images, by the formula."""
    u = F.normalize(rows, dim=1)
    return (((u - u.mean(0)) ** 2).sum(0) / (len(u) - 1)).sqrt().mean().item() * math.sqrt(u.shape[1])


def test_each_side_by_hand_on_a_stand_in_encoder():
    """r = 3 draws of N = 4 images. Source: one standard view and MultiCrop's 2 small crops (pooled:
    K = 9 encodings per image), the predictor left out. Target: MeanEnc of 2 views, one forward of
    2N rows (K = 3). BN's running statistics and the random state are as before."""
    n, r, m = 4, 3, 2
    g = torch.Generator().manual_seed(5)
    draws = [{"source": torch.randn(n, 3, 4, 4, generator=g), "source_small": torch.randn(m * n, 3, 2, 2, generator=g),
              "target": torch.randn(2 * n, 3, 4, 4, generator=g)} for _ in range(r)]
    source, target = StandIn(0, predictor=True), StandIn(1, predictor=False)
    args = argparse.Namespace(variance_views=r, mean_enc_source=1, mean_enc=2, multicrop=m, multicrop_per_crop=False,
                              channels_last=False, amp="off", seed=0)
    rng, running = torch.get_rng_state(), source.projector[1].running_var.clone()
    encode = lambda x, side: simsiam.side_encode(source, target, x, side, args)  # noqa: E731
    got = augment.asymmetry_variance((source, target), encode, [(d, None) for d in draws], torch.device("cpu"), args)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(source.projector[1].running_var, running)
    assert source.projector[1].num_batches_tracked.item() == 0

    ws, wt = source.projector[0].weight, target.projector[0].weight
    standard = [by_hand(d["source"], ws) for d in draws]  # r x NxD
    small = [by_hand(d["source_small"], ws).chunk(m) for d in draws]  # r x m x NxD: the crops in one forward
    mean2 = [by_hand(d["target"], wt).view(2, n, 4).mean(0) for d in draws]  # r x NxD
    v_source = sum(variance_of([standard[j][i] for j in range(r)] + [small[j][c][i] for j in range(r) for c in range(m)])
                   for i in range(n)) / n
    v_target = sum(variance_of([mean2[j][i] for j in range(r)]) for i in range(n)) / n
    assert got["v_source"] == pytest.approx(v_source, rel=1e-5)
    assert got["v_target"] == pytest.approx(v_target, rel=1e-5)
    assert got["v_ratio"] == pytest.approx(v_target / v_source, rel=1e-5)
    assert got["v_uniform_source"] == (1 - 1 / 9) / 4 and got["v_uniform_target"] == (1 - 1 / 3) / 4
    assert got["v_std_source"] == pytest.approx(sum(simsiam_std_of(z) for z in standard) / r, rel=1e-5)
    assert got["v_std_target"] == pytest.approx(sum(simsiam_std_of(z) for z in mean2) / r, rel=1e-5)
    with_predictor = [source([d["source"]])[0] for d in draws]  # what the monitor must not measure
    assert not torch.allclose(with_predictor[0].double(), standard[0], atol=1e-3)


def test_probe_batches_by_hand(monkeypatch):
    """20 images, --batch-size 8, r = 2: two global batches of 8 (the last 4 images left out), each
    drawn twice; on 2 processes, process 1 takes images 1, 3, 5, 7 of each batch, as training's sampler."""
    args = argparse.Namespace(batch_size=8, bn_splits=2, variance_views=2)
    assert augment.probe_batches(20, args) == [[2 * i + j for i in range(start, start + 8)] for start in (0, 8) for j in (0, 1)]
    monkeypatch.setattr(augment, "world_size", lambda: 2)
    monkeypatch.setattr(augment, "rank", lambda: 1)
    args.bn_splits = 1
    assert augment.probe_batches(20, args) == [[2 * i + j for i in range(start + 1, start + 8, 2)]
                                               for start in (0, 8) for j in (0, 1)]
    assert augment.probe_batches(6, args) == [[2, 6, 10], [3, 7, 11]]  # fewer images than a batch: G = 6, images 1, 3, 5
    with pytest.raises(augment.InputError, match="needs 4 or more held-out images"):
        augment.probe_batches(3, args)


def test_variance_flags_follow_knn_and_do_not_change_the_run():
    assert moco.parse_args(["--knn-every", "3"]).variance_every == 3
    assert moco.parse_args(["--knn-every", "3", "--variance-every", "-1"]).variance_every == -1
    assert {"variance_every", "variance_images", "variance_views"} <= moco.RESUMABLE


# ---------------------------------------------------------------------------------------------
# In training: variance.py's numbers, two processes, no effect on the run
# ---------------------------------------------------------------------------------------------
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--print-freq", "1",
        "--knn-every", "-1"]
SMALL = {"mocov2": ["--queue-size", "64"], "simsiam": ["--dim", "32", "--proj-dim", "64", "--pred-dim", "16"]}
MONITOR = ["--variance-views", "3", "--variance-images", "16"]


def monitor_records(output_dir):
    return [r for r in read_log(output_dir) if "v_source" in r]


@pytest.mark.parametrize("framework", ["mocov2", "simsiam"])
def test_the_log_equals_variance_py_sides_for_the_checkpoint(framework, folder, tmp_path):
    """The monitor at the end of a run and variance.py --sides on the checkpoint it saved: the same
    numbers (one implementation), with MultiCrop, AsymBN, MeanEnc and per-device BN."""
    script = moco if framework == "mocov2" else simsiam
    script.main(TINY + SMALL[framework] + MONITOR + ["--data", folder, "--epochs", "1", "--variance-every", "0",
                                                     "--multicrop", "2", "--asym-bn", "--mean-enc", "2", "--bn-splits", "2",
                                                     "--output-dir", str(tmp_path / "run")])
    logged = monitor_records(tmp_path / "run")
    assert [r["step"] for r in logged] == [3] and logged[0]["variance_time"] > 0
    variance.main(["--checkpoint", str(tmp_path / "run"), "--sides", "--data", folder, "--num-images", "16", "--views", "3",
                   "--workers", "0", "--output-dir", str(tmp_path / "sides")])
    reported = json.loads((tmp_path / "sides" / "variance_sides.json").read_text())
    assert sorted(reported) == sorted(k for k in logged[0] if k.startswith("v_"))
    for key, value in reported.items():
        assert value == pytest.approx(logged[0][key], rel=1e-6, abs=1e-12), key
    assert 0 < reported["v_source"] < reported["v_uniform_source"] and 0 < reported["v_target"] < reported["v_uniform_target"]
    table = (tmp_path / "sides" / "variance.md").read_text()
    assert f"| source | {reported['v_source'] * 1e4:.2f} | 9 |" in table  # 3 draws x (1 + 2 small crops)


def probe_record(flags, folder):
    """asymmetry_variance of freshly built MoCo v2 encoders (AsymBN, MeanEnc, MultiCrop) on the
    folder's 16 test images, in this process's share; -> the record and this process's items."""
    args = moco.parse_args(TINY + SMALL["mocov2"] + MONITOR + ["--data", folder, "--batch-size", "8", "--asym-bn",
                                                               "--mean-enc", "2", "--multicrop", "2"] + flags)
    args.amp = "off"
    source, target = moco.build_encoders(args, torch.device("cpu"))
    loader = augment.probe_loader(augment.dataset(folder, "test", None).base, moco.make_views(args), args)
    encode = lambda x, side: moco.side_encode(source, target, x, side, args)  # noqa: E731
    record = augment.asymmetry_variance((source, target), encode, loader, torch.device("cpu"), args)
    return {"record": torch.tensor([record[k] for k in sorted(record)], dtype=torch.float64),
            "items": torch.tensor(sum(loader.batch_sampler, []))}


def _probe_record(rank, folder):
    return probe_record([], folder)


def test_two_processes_each_take_half_and_equal_one(folder):
    """2 processes (per-device BN, the target's SyncBN and BN shuffle across them) == 1 process
    emulating the 2 devices (--bn-splits 2), each process encoding its half of every batch."""
    one = probe_record(["--bn-splits", "2"], folder)
    two = spawn(_probe_record, folder)
    torch.testing.assert_close(two[0]["record"], two[1]["record"])
    torch.testing.assert_close(two[0]["record"], one["record"], rtol=1e-5, atol=0)
    halves = [set(t["items"].tolist()) for t in two]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(one["items"].tolist())
    assert len(one["items"]) == 16 * 3


def test_the_monitor_does_not_change_the_run(folder, tmp_path, capsys):
    """The same run with the monitors (variance, kNN) after every epoch and without: bitwise the same checkpoint
    (source, target, queue, optimizer, random state) and losses. MoCo v2 with per-device BN (the
    monitor's train-mode forwards would move the running statistics) and the BN shuffle (it draws
    from the random state)."""
    common = TINY + SMALL["mocov2"] + MONITOR + ["--data", folder, "--epochs", "2", "--bn-splits", "2", "--asym-bn",
                                                 "--mean-enc-source", "3"]
    moco.main(common + ["--variance-every", "1", "--knn-every", "1", "--output-dir", str(tmp_path / "on")])
    moco.main(common + ["--variance-every", "-1", "--output-dir", str(tmp_path / "off")])
    assert [r["step"] for r in monitor_records(tmp_path / "on")] == [0, 3, 6] and not monitor_records(tmp_path / "off")
    assert step_losses(tmp_path / "on") == step_losses(tmp_path / "off")
    on = torch.load(tmp_path / "on" / "checkpoint.pth", weights_only=True)
    off = torch.load(tmp_path / "off" / "checkpoint.pth", weights_only=True)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    for part in ("source", "target", "queue", "optimizer", "rng"):
        assert same(on[part], off[part]), part
