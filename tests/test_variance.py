"""variance.py against hand computations: the intra-sample variance ((1 - 1/r)/d on the sphere, 0 for
identical views, halved by MeanEnc of 2, the (1 - ||mean||^2)/d formula), the collapse AUC
(flat, rank one, monotone, min(N, D) values as Li et al.), the BN batches of each design,
checkpoints of every script, every design end to end with its outputs, MultiCrop > baseline >
MeanEnc:2 on a random ResNet, 1 process == 2 processes, --skip-bad-images measuring each readable
image once, and one error line for bad input (a contradicting --arch, a refused pickle)."""
import argparse
import csv
import importlib.util
import os
import shutil

import numpy as np

import pytest
import torch
import torch.nn.functional as F

import augment
import variance
from conftest import run_in_processes


TINY = ["--framework", "mocov2", "--arch", "resnet18", "--image-size", "32", "--data", "synthetic",
        "--workers", "0", "--print-freq", "1000"]


# ---------------------------------------------------------------------------------------------
# The variance of r encodings of an image
# ---------------------------------------------------------------------------------------------
def test_uniform_encodings_on_the_sphere_give_one_over_d():
    torch.manual_seed(0)
    r, n, d = 32, 4000, 128
    v = variance.intra_sample_variance(torch.randn(r, n, d))  # normalised Gaussians: uniform on the sphere
    # E||mean of r unit vectors||^2 = 1/r, so the population variance is (1 - 1/r)/d, about 1/d
    assert v.mean().item() == pytest.approx((1 - 1 / r) / d, rel=0.01)
    assert v.mean().item() == pytest.approx(1 / d, rel=0.05)
    assert variance.uniform_reference(r, d) == (1 - 1 / r) / d  # the reference printed for r views
    v2 = variance.intra_sample_variance(torch.randn(2, n, d)).mean().item()
    assert v2 == pytest.approx(variance.uniform_reference(2, d), rel=0.02)  # r = 2: half of 1/d


def test_identical_views_give_zero():
    z = torch.randn(1, 5, 16).expand(8, 5, 16) * torch.rand(8, 1, 1).add(0.5)  # same direction, other lengths
    assert torch.allclose(variance.intra_sample_variance(z), torch.zeros(5), atol=1e-7)


def test_formula_is_one_minus_squared_norm_of_the_mean_over_d():
    torch.manual_seed(0)
    r, n, d = 5, 3, 7
    z = torch.randn(r, n, d) * 3 + 1
    for i in range(n):
        units = [z[j, i] / z[j, i].norm() for j in range(r)]
        mean = sum(units) / r
        by_dims = sum(sum((u[c] - mean[c]) ** 2 for u in units) / r for c in range(d)) / d
        assert variance.intra_sample_variance(z)[i].item() == pytest.approx(by_dims.item(), rel=1e-5)
        assert variance.intra_sample_variance(z)[i].item() == pytest.approx((1 - mean.norm() ** 2).item() / d, rel=1e-5)


def test_mean_of_two_noisy_encodings_halves_the_variance():
    """MeanEnc: each encoding the un-normalised mean of 2 i.i.d. noisy ones, through encodings()."""
    torch.manual_seed(0)
    r, n, d = 16, 500, 64
    centre = F.normalize(torch.randn(1, 1, n, d), dim=-1)
    features = centre + 0.02 * torch.randn(r, 2, n, d)  # r x n x N x D: 2 encodings per view
    args = argparse.Namespace(features="backbone", amp="off")
    mean2 = variance.encodings(None, features, torch.device("cpu"), args)  # r x N x D
    single = variance.encodings(None, features[:, :1], torch.device("cpu"), args)
    assert torch.allclose(mean2, features.mean(1))
    ratio = variance.intra_sample_variance(mean2).mean() / variance.intra_sample_variance(single).mean()
    assert ratio.item() == pytest.approx(0.5, abs=0.03)


# ---------------------------------------------------------------------------------------------
# Dimensional collapse: the spectrum and its AUC
# ---------------------------------------------------------------------------------------------
def test_cev_and_auc_by_hand():
    cev, auc = variance.cumulative_explained_variance(torch.tensor([1.0, 3.0, 2.0]))  # sorted inside
    assert cev.tolist() == pytest.approx([0.5, 5 / 6, 1.0])
    assert auc == pytest.approx((0.5 + 5 / 6 + 1.0) / 3)


@pytest.mark.parametrize("d", [1, 8, 64])
def test_flat_spectrum_gives_d_plus_one_over_2d_and_rank_one_gives_one(d):
    torch.manual_seed(0)
    x = torch.randn(200, d, dtype=torch.float64)
    q = torch.linalg.qr(x - x.mean(0)).Q  # centred orthonormal columns: every singular value 1
    s = variance.singular_values(q * 7)
    assert torch.allclose(s, torch.full((d,), 7.0, dtype=torch.float64))
    assert variance.cumulative_explained_variance(s)[1] == pytest.approx((d + 1) / (2 * d))
    rank_one = torch.randn(200, 1, dtype=torch.float64) @ torch.randn(1, d, dtype=torch.float64)
    assert variance.cumulative_explained_variance(variance.singular_values(rank_one))[1] == pytest.approx(1.0, abs=1e-9)


def test_fewer_images_than_dimensions_give_min_n_d_values_as_li_et_al():
    """N = 6 images of D = 16 dimensions: Li et al.'s torch.svd(R).S has 6 values (the last about 0
    after centring), and the AUC is the mean of those 6 CEV points, by hand with numpy."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, 16)) @ np.diag(np.linspace(3, 0.1, 16))
    s = np.linalg.svd(features - features.mean(0), compute_uv=False)
    assert len(s) == 6 and s[-1] < 1e-9
    cev = [sum(s[:k]) / sum(s) for k in range(1, 7)]
    got = variance.singular_values(torch.from_numpy(features))
    assert got.tolist() == pytest.approx(s.tolist(), abs=1e-9)
    args = argparse.Namespace(collapse_l2=False)
    _, got_cev, auc, _, n, dim, _ = variance.collapse_measures(torch.from_numpy(features), args)
    assert (n, dim, len(got_cev)) == (6, 16, 6) and got_cev.tolist() == pytest.approx(cev)
    assert auc == pytest.approx(sum(cev) / 6)


def test_auc_rises_with_the_decay_of_the_spectrum():
    k = torch.arange(1, 129, dtype=torch.float64)
    aucs = [variance.cumulative_explained_variance(k ** -alpha)[1] for alpha in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert aucs[0] == pytest.approx(129 / 256)
    assert all(a < b for a, b in zip(aucs, aucs[1:])), aucs


def test_singular_values_centre_the_columns_and_may_normalise_the_rows():
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    shifted = variance.singular_values(x + torch.arange(6.0) * 100)  # a constant per column is removed
    assert torch.allclose(shifted, variance.singular_values(x), atol=1e-9)
    rows = x * torch.rand(50, 1).add(0.1)
    assert torch.allclose(variance.singular_values(rows, l2=True), variance.singular_values(F.normalize(rows, dim=1)))
    assert variance.simsiam_std(torch.randn(4096, 64)) == pytest.approx(1.0, abs=0.03)
    assert variance.simsiam_std(torch.ones(10, 64)) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# The BN batches of each design, against a hand computation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("design", ["baseline", "syncbn", "meanenc:2", "multicrop"])
def test_each_design_by_hand(design):
    """16 images, B=4, k=2, r=2: the backbone sees B images (N*B for MeanEnc, view-major) per
    forward; the projector the same, or 2 x B for syncbn."""
    args = variance.parse_args(TINY + ["--views", "2", "--batch-size", "4", "--syncbn-devices", "2"])
    args.amp = "off"
    encoder, args.framework, _ = variance.build_encoder(args, torch.device("cpu"))
    dataset = augment.dataset("synthetic", "test", None)
    progress = variance.Progress(1, args)
    progress.begin(design, 16)
    got, d = variance.measure(encoder, design, dataset, variance.image_batches(range(16), args), torch.device("cpu"), progress, args)
    assert d == 128 and got.shape == (16,)

    kind, n = variance.parse_design(design)
    views = torch.stack([dataset[i][0] for i in range(16)])  # 16 x (r*n) x 3xSxS, as measure() saw them
    if kind == "multicrop":
        assert views.shape[-1] == augment.small_crop_size(32) == 16
    encoder.train()
    expected = []
    with torch.no_grad():
        for start in range(0, 16, 8):  # SyncBN groups of k*B = 8 images
            z = []
            for j in range(2):  # view j of each image
                x = views[start:start + 8, j * n:(j + 1) * n]  # 8 x n x 3xSxS
                per_batch = [torch.cat(list(x[b:b + 4].transpose(0, 1))) for b in (0, 4)]  # (n*4) view-major
                f = [encoder.backbone(xb) for xb in per_batch]
                if kind == "syncbn":
                    out = encoder.projector(torch.cat(f)).view(2, 4, -1)
                else:
                    out = torch.stack([encoder.projector(fb).view(n, 4, -1).mean(0) for fb in f])
                z.append(F.normalize(out.reshape(8, -1), dim=1))
            z = torch.stack(z)  # r x 8 x D
            expected.append(((z - z.mean(0)) ** 2).mean(0).mean(1))
    assert torch.allclose(got, torch.cat(expected), rtol=1e-4, atol=1e-8)
    if kind == "syncbn":  # not vacuous: a batch of 8 differs from two of 4
        progress.begin("baseline", 16)
        base, _ = variance.measure(encoder, "baseline", dataset, variance.image_batches(range(16), args),
                                   torch.device("cpu"), progress, args)
        assert not torch.allclose(got, base, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Checkpoints of every script
# ---------------------------------------------------------------------------------------------
SMALL = {"mocov2": [], "byol": ["--mlp-dim", "32"], "simsiam": ["--dim", "32", "--proj-dim", "32", "--pred-dim", "8"],
         "simclr": ["--mlp-dim", "32"], "barlow": ["--projector", "32-32-32"], "mocov3": ["--mlp-dim", "32"]}


@pytest.mark.parametrize("framework", list(SMALL))
def test_checkpoint_of_every_script_is_detected_and_loaded(framework, tmp_path):
    module = importlib.import_module(f"{framework}_asym")
    train_args = module.parse_args(["--arch", "resnet18", "--image-size", "48", "--asym-bn"] + SMALL[framework])
    torch.manual_seed(1)
    source = module.Encoder(train_args, True) if framework in ("byol", "simsiam", "mocov3") else module.Encoder(train_args)
    torch.save({"args": vars(train_args), "source": source.state_dict(), "target": {}}, tmp_path / "checkpoint.pth")
    args = variance.parse_args(["--checkpoint", str(tmp_path)])  # the output dir is enough
    encoder, detected, model_args = variance.build_encoder(args, torch.device("cpu"))
    assert detected == framework and model_args.image_size == 48
    for key, value in source.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_design_end_to_end_writes_table_csv_and_plots(tmp_path, capsys):
    variance.main(TINY + ["--num-images", "32", "--views", "2", "--batch-size", "8", "--syncbn-devices", "2",
                          "--collapse", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    rows = {row["design"]: row for row in read_csv(tmp_path / "variance.csv")}
    assert list(rows) == list(variance.DESIGNS)
    v = {design: float(row["variance"]) for design, row in rows.items()}
    assert all(0 < value < 1 / 128 for value in v.values()), v
    assert all(float(rows[d]["ratio_to_baseline"]) == pytest.approx(v[d] / v["baseline"], rel=1e-3) for d in v)
    per_image = read_csv(tmp_path / "variance_per_image.csv")
    assert len(per_image) == 32
    for design in v:  # the table's v is the mean of the per-image variances
        assert sum(float(row[design]) for row in per_image) / 32 == pytest.approx(v[design], rel=1e-4)
    table = (tmp_path / "variance.md").read_text()
    assert "uniform on the sphere give (1 - 1/r)/d = 39.1e-4 for r=2, d=128." in table.splitlines()[0]
    assert "| MultiCrop |" in table and "| MeanEnc(n=2) |" in table and "| 32 | 512 | 32 | raw |" in table
    assert "pairs of designs in the paper's order." in table and "| MeanEnc(n=2) |" in table
    assert "down, down: agrees |" in table.split("| MeanEnc(n=2) |")[1].splitlines()[0]  # halved: beyond noise
    assert table.splitlines()[0] in printed and "images/s, ETA" in printed
    spectrum = read_csv(tmp_path / "collapse_spectrum.csv")
    assert len(spectrum) == 32 and float(spectrum[-1]["cev"]) == pytest.approx(1.0)
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped: matplotlib is not installed" in printed
        pytest.skip("matplotlib is not installed (pip install -r requirements-extra.txt): "
                    "the PNG files are not checked")  # one reason: one summary line
    assert (tmp_path / "variance.png").stat().st_size > 0 and (tmp_path / "collapse.png").stat().st_size > 0


def test_directions_and_ordering_against_the_paper_by_hand():
    """Each design's direction (up: v above the baseline's) ours and the paper's; the ordering's pairs
    counted by hand: MultiCrop 9 > WeakerAug 6 > baseline 5 > MeanEnc 2, the paper's MultiCrop >
    baseline > WeakerAug > MeanEnc: 5 of the 6 pairs alike (baseline, WeakerAug the one swapped)."""
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert variance.direction("multicrop", base + torch.tensor([0.9, 1.1, 1.0, 1.0]), base) == "up, up: agrees"
    assert variance.direction("weaker", base + 1, base) == "up, down: differs"
    assert variance.direction("syncbn", base - 0.1, base) == "down, down: agrees"  # the paper's 8.3 / 8.5
    # differences -1, +1.2, -1, +1: mean 0.05, standard error 0.57: within noise
    assert variance.direction("scalemix", base + torch.tensor([-1.0, 1.2, -1.0, 1.0]), base) == "within noise, up"
    assert variance.direction("syncbn", base, base) == "within noise, down"
    assert variance.direction("baseline", base, base) == "" and variance.direction("meanenc:3", base / 2, base) == ""
    line = variance.ordering({"baseline": 5.0, "multicrop": 9.0, "weaker": 6.0, "meanenc:2": 2.0})
    assert line == ("Ordered by v: MultiCrop > WeakerAug > baseline > MeanEnc(n=2); the paper's: MultiCrop > "
                    "baseline > WeakerAug > MeanEnc(n=2); 5 of 6 pairs of designs in the paper's order.")


def test_multicrop_above_baseline_above_meanenc_on_a_random_resnet(tmp_path):
    """A random ResNet-18 (CIFAR stem) on synthetic: MultiCrop raises the variance (+9% here) and
    MeanEnc:2 lowers it (-40%), as in the paper; the paired standard error of MultiCrop's rise is 3%."""
    variance.main(TINY + ["--cifar-stem", "--num-images", "64", "--views", "4", "--batch-size", "16",
                          "--designs", "multicrop", "meanenc:2", "--output-dir", str(tmp_path)])
    v = {row["design"]: float(row["variance"]) for row in read_csv(tmp_path / "variance.csv")}
    assert v["multicrop"] > 1.05 * v["baseline"] and v["baseline"] > 1.5 * v["meanenc:2"], v


def test_two_processes_give_the_one_process_numbers(tmp_path):
    """Groups of k*B images are split over the processes: the same BN batches, the same numbers."""
    common = TINY + ["--num-images", "16", "--views", "2", "--batch-size", "4", "--syncbn-devices", "2",
                     "--designs", "syncbn", "meanenc:2"]
    variance.main(common + ["--output-dir", str(tmp_path / "one")])
    run_in_processes("variance.py", [common + ["--output-dir", str(tmp_path / "two")]])
    one, two = read_csv(tmp_path / "one" / "variance_per_image.csv"), read_csv(tmp_path / "two" / "variance_per_image.csv")
    assert len(one) == len(two) == 16
    for a, b in zip(one, two):
        for design in ("baseline", "syncbn", "meanenc:2"):
            assert float(a[design]) == pytest.approx(float(b[design]), rel=1e-4)


def test_skip_bad_images_measures_each_readable_image_once(folder, tmp_path, capsys):
    """An unreadable test image: left out (not replaced by the next image, which would then count
    twice), and said in the table; the first 16 images hold 15 readable ones, 12 measured (B = 4)."""
    data = shutil.copytree(folder, tmp_path / "data")
    samples = [path for path, _ in augment.ImageFiles(str(data / "test")).samples]
    bad = samples.index(str(data / "test" / "3" / "3.png"))
    (data / "test" / "3" / "3.png").write_bytes(b"not a png")
    argv = TINY + ["--data", str(data), "--num-images", "16", "--views", "2", "--batch-size", "4",
                   "--designs", "baseline", "--skip-bad-images", "--output-dir", str(tmp_path / "out")]
    variance.main(argv)
    images = [int(row["image"]) for row in read_csv(tmp_path / "out" / "variance_per_image.csv")]
    assert images == [i for i in range(16) if i != bad][:12]
    assert "12 " + str(data) + " held-out images (1 unreadable left out)" in (tmp_path / "out" / "variance.md").read_text()
    assert "1 of 16 held-out images cannot be read and are left out" in capsys.readouterr().err


def error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        variance.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_is_one_error_line_before_work(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "out")]
    assert "a variance needs 2 or more views" in error_line(TINY + ["--views", "1"] + out, capsys)
    assert "unknown design" in error_line(TINY + ["--designs", "cutmix"] + out, capsys)
    assert "meanenc:N" in error_line(TINY + ["--designs", "meanenc:0"] + out, capsys)
    assert "no such directory" in error_line(TINY + ["--data", "/nonexistent/images"] + out, capsys)
    assert "no such file" in error_line(TINY + ["--checkpoint", str(tmp_path / "missing.pth")] + out, capsys)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "backbone.pth")
    assert "not a checkpoint.pth" in error_line(TINY + ["--checkpoint", str(tmp_path / "backbone.pth")] + out, capsys)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    assert "cannot read" in error_line(TINY + ["--checkpoint", str(tmp_path / "junk.pth")] + out, capsys)
    assert "fewer than one --batch-size" in error_line(TINY + ["--num-images", "8", "--batch-size", "16"] + out, capsys)
    assert "not an architecture" in error_line(TINY + ["--arch", "resnet7"] + out, capsys)
    assert not (tmp_path / "out").exists()


def test_arch_that_contradicts_the_checkpoint_and_a_refused_pickle_are_errors(tmp_path, capsys):
    module = importlib.import_module("mocov2_asym")
    train_args = module.parse_args(["--arch", "resnet18", "--image-size", "32"])
    torch.save({"args": vars(train_args), "source": module.Encoder(train_args).state_dict()}, tmp_path / "checkpoint.pth")
    out = ["--output-dir", str(tmp_path / "out")]
    checkpoint = ["--checkpoint", str(tmp_path), "--workers", "0", "--num-images", "8", "--batch-size", "4"]
    assert f"--arch resnet50, but --checkpoint {tmp_path} holds a resnet18" in error_line(checkpoint + ["--arch", "resnet50"] + out, capsys)
    assert "--cifar-stem, but --checkpoint" in error_line(checkpoint + ["--cifar-stem"] + out, capsys)

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"args": {}, "source": {}, "hook": Evil()}, tmp_path / "evil.pth")
    line = error_line(TINY + ["--checkpoint", str(tmp_path / "evil.pth")] + out, capsys)
    assert "it holds objects other than tensors and plain containers (the first: posix.system)" in line and "\x1b" not in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The views gallery
# ---------------------------------------------------------------------------------------------
def gallery_args(tmp_path, *extra):
    return variance.parse_args(TINY + ["--gallery", "--gallery-images", "2", "--output-dir", str(tmp_path), *extra])


def test_gallery_cells_are_the_training_views_one_labelled_cell_each(tmp_path):
    """A cell per view of each placement, side and image, labelled; MultiCrop's small crops at 16 px;
    ScaleMix's cell is the view Views gives and its box the pasted one: the first view outside it,
    the second inside."""
    rows = dict(variance.gallery(gallery_args(tmp_path)))
    assert "SyncBN source" not in rows and len(rows) == len(variance.PLACEMENTS) - 2  # no view change
    expected = {"baseline": (1, 1), "MultiCrop source": (7, 1), "MultiCrop target": (1, 7), "MeanEnc (3,1)": (3, 1),
                "MeanEnc (1,3)": (1, 3), "ScaleMix target": (1, 1), "WeakerAug target": (1, 1)}
    for name, (n_source, n_target) in expected.items():
        for image in (0, 1):
            sides = [side for i, side, *_ in rows[name] if i == image]
            assert sides == ["source"] * n_source + ["target"] * n_target, name
    assert all(label for *_, label, _, _ in [c[:3] + c[2:] for cells in rows.values() for c in cells])
    small = [c for c in rows["MultiCrop target"] if c[2].startswith("t") and c[2] != "T"]
    assert [c[2] for c in small[:6]] == [f"t{j}" for j in range(1, 7)]
    assert {c[3].shape for c in small} == {(3, 16, 16)} and rows["baseline"][0][3].shape == (3, 32, 32)

    image = augment.base_dataset("synthetic", "test")[500][0]  # the second of 2 spread over 1000
    views = augment.Views(32, "mocov2", scalemix_on="source")
    (_, side, label, pixels, box), = [c for c in rows["ScaleMix source"] if c[0] == 1 and c[1] == "source"]
    assert (side, label) == ("source", "S mix") and box is not None
    with torch.random.fork_rng():
        torch.manual_seed(0 * 1_000_003 + 1)
        assert torch.equal(pixels, variance.to_uint8(views(image)["source"][0]))  # Views' own view
        torch.manual_seed(0 * 1_000_003 + 1)
        first, second = views.transforms["source"](augment.v2.functional.pil_to_tensor(image)), None
        second = views.transforms["source"](augment.v2.functional.pil_to_tensor(image))
    top, bottom, left, right = box
    mixed = first.clone()
    mixed[:, top:bottom, left:right] = second[:, top:bottom, left:right]
    assert torch.equal(pixels, variance.to_uint8(mixed)) and not torch.equal(pixels, variance.to_uint8(first))


def test_gallery_png_repeats_with_its_seed(tmp_path):
    variance.gallery(gallery_args(tmp_path / "a", "--placements", "baseline", "multicrop:source", "scalemix:source"))
    variance.gallery(gallery_args(tmp_path / "b", "--placements", "baseline", "multicrop:source", "scalemix:source"))
    variance.gallery(gallery_args(tmp_path / "c", "--placements", "baseline", "multicrop:source", "scalemix:source",
                                  "--seed", "1"))
    png = [(tmp_path / name / "views.png").read_bytes() for name in "abc"]
    assert png[0][:8] == b"\x89PNG\r\n\x1a\n" and png[0] == png[1] and png[0] != png[2]


# ---------------------------------------------------------------------------------------------
# The gradient noise (the paper's Sec. 5)
# ---------------------------------------------------------------------------------------------
def test_gradient_noise_by_hand():
    """g(s, t) = a_s + b_t: V_t is b's spread over draws 1..R, V_s a's, V that of a_j + b_j (population,
    / R), the signal ||mean||^2 less V / (R - 1); views held fixed give no noise; a gradient that
    only the target's draw moves has V_s = 0 (the sides not swapped)."""
    torch.manual_seed(0)
    a, b, r = torch.randn(5, 3).double() + 2, torch.randn(5, 3).double(), 4
    got = variance.gradient_noise(lambda s, t: a[s] + b[t], r)
    spread = lambda x: ((x - x.mean(0)) ** 2).sum(1).mean().item()  # noqa: E731
    both = a[1:] + b[1:]
    assert got["V_t"] == pytest.approx(spread(b[1:])) and got["V_s"] == pytest.approx(spread(a[1:]))
    assert got["V"] == pytest.approx(spread(both))
    assert got["signal"] == pytest.approx(both.mean(0).square().sum().item() - spread(both) / (r - 1))
    assert got["noise_to_signal"] == pytest.approx(got["V"] / got["signal"])
    fixed = variance.gradient_noise(lambda s, t: a[0] + b[0], r)
    assert fixed["V_t"] == fixed["V_s"] == fixed["V"] == 0
    assert fixed["signal"] == pytest.approx((a[0] + b[0]).square().sum().item())
    terms = ((both - both.mean(0)) ** 2).sum(1)  # V's standard error: the spread of its R terms / sqrt(R)
    assert got["V_se"] == pytest.approx(terms.std().item() / r ** 0.5)
    target_only = variance.gradient_noise(lambda s, t: b[t], r)
    assert target_only["V_s"] == 0 and target_only["V_t"] == pytest.approx(target_only["V"]) and target_only["V"] > 0


def test_grad_noise_verdicts_against_sec_5():
    """Sec. 5's prediction per placement and the measured V_t against the baseline's, beyond twice
    the standard error of the difference (here sqrt(0.3^2 + 0.4^2) = 0.5) or within it."""
    assert [variance.predicted(name) for name in ("MultiCrop target", "ScaleMix both", "WeakerAug target",
                                                  "SyncBN target", "StrongerAug source", "MeanEnc (1,3)",
                                                  "MeanEnc (3,1)")] == ["higher", "higher", "lower", "lower",
                                                                        None, "lower", None]
    base = {"V_t": 5.0, "V_t_se": 0.3}
    assert variance.compared({"V_t": 6.1, "V_t_se": 0.4}, base, "higher") == "higher, beyond noise: as predicted"
    assert variance.compared({"V_t": 6.1, "V_t_se": 0.4}, base, "lower") == "higher, beyond noise: not as predicted"
    assert variance.compared({"V_t": 4.1, "V_t_se": 0.4}, base, "higher") == "lower, within noise"
    assert variance.compared({"V_t": 3.9, "V_t_se": 0.4}, base, None) == "lower, beyond noise"


def test_grad_noise_equals_a_direct_autograd_loop(tmp_path):
    """--grad-noise on a MoCo v2 checkpoint (8 images, R = 2, one BN group: no shuffle) equals dL/dW
    by torch.autograd over the same views, InfoNCE written out: baseline and MeanEnc (1,2)."""
    import mocov2_asym as moco
    run_args = moco.parse_args(["--arch", "resnet18", "--image-size", "32", "--queue-size", "32", "--batch-size", "8",
                                "--workers", "0", "--seed", "3"])
    source, target = moco.build_encoders(run_args, torch.device("cpu"))
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the target not the source's copy
    queue = moco.Queue(32, 128)
    torch.save({"framework": "mocov2", "step": 5, "steps_per_epoch": 10, "args": vars(run_args),
                "source": source.state_dict(), "target": target.state_dict(), "queue": queue.state_dict()},
               tmp_path / "checkpoint.pth")
    args = variance.parse_args(["--checkpoint", str(tmp_path), "--grad-noise", "--views", "2", "--data", "synthetic",
                                "--placements", "baseline", "meanenc:1,2", "--output-dir", str(tmp_path / "out")])
    rows = dict(variance.grad_noise(args, torch.device("cpu")))

    images = [augment.base_dataset("synthetic", "test")[i][0] for i in range(8)]
    weight = source.projector[-1].weight
    for name, n_t in (("baseline", 1), ("MeanEnc (1,2)", 2)):
        views = augment.Views(32, "mocov2", n_target=n_t)

        def side(s, j):  # draw j of one side: views of the 8 images, view-major
            drawn = []
            for i, image in enumerate(images):
                with torch.random.fork_rng():
                    torch.manual_seed(variance.draw_seed(0, s, j, i))
                    drawn.append(views(image)[s])
            return torch.stack(drawn, 1).flatten(0, 1)

        def gradient(s, t):
            q = F.normalize(source.projector(source.backbone(side("source", s))), dim=1)
            with torch.no_grad():
                k = F.normalize(target.projector(target.backbone(side("target", t))).view(n_t, 8, -1).mean(0), dim=1)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.keys.T], 1) / 0.2
            loss = -torch.log_softmax(logits, 1)[:, 0].mean()
            return torch.autograd.grad(loss, weight)[0].flatten().double()

        source.train(), target.train()
        g_t = torch.stack([gradient(0, j) for j in (1, 2)])
        g_s = torch.stack([gradient(j, 0) for j in (1, 2)])
        g = torch.stack([gradient(j, j) for j in (1, 2)])
        spread = lambda x: ((x - x.mean(0)) ** 2).sum(1).mean().item()  # noqa: E731
        assert rows[name]["V_t"] == pytest.approx(spread(g_t), rel=1e-4) and spread(g_t) > 0, name
        assert rows[name]["V_s"] == pytest.approx(spread(g_s), rel=1e-4), name
        assert rows[name]["V"] == pytest.approx(spread(g), rel=1e-4), name
        assert rows[name]["signal"] == pytest.approx(g.mean(0).square().sum().item() - spread(g), rel=1e-4)
    table = (tmp_path / "out" / "gradient_noise.md").read_text()
    assert "| MeanEnc (1,2) |" in table and "| lower | lower, " in table and "| baseline |" in table
    assert len(read_csv(tmp_path / "out" / "gradient_noise.csv")) == 2


def test_help_ends_with_examples_of_every_mode(capsys):
    with pytest.raises(SystemExit):
        variance.main(["--help"])
    examples = capsys.readouterr().out.split("Examples:")[1]
    assert all(mode in examples for mode in ("--checkpoint runs/quickstart", "--sides", "--gallery", "--grad-noise"))


def test_grad_noise_and_gallery_bad_input_one_line(capsys):
    for argv, message in ((["--grad-noise"], "give its --checkpoint"),
                          (["--gallery", "--placements", "mixup:source"], "--placements mixup:source"),
                          (["--gallery", "--sides"], "--sides and --gallery: one at a time")):
        with pytest.raises(SystemExit) as stop:
            variance.main(TINY + argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
