"""transfer.py: the logistic-regression probe (L-BFGS recovers a separable problem at a stationary
point and the optimum of a problem solved by hand, in float64 whatever the features' dtype; the wd
search follows the validation score with lambda = wd / n; the retrain uses train+val), the metrics
against hand computations, the file-list loaders, one class map for every split, the feature cache
keyed on the data's files, --skip-bad-images, and end to end on a folder and on real CIFAR-10."""
import csv
import math
import os
import shutil

import pytest
import torch
from PIL import Image

import augment
import lincls
import transfer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one thread (as run_in_processes's) spares every op
    a wait for a busy second core, many times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n, seed, classes=3, dim=5):
    """n points per class around far-apart centres: a linearly separable problem."""
    g = torch.Generator().manual_seed(seed)
    centres = 6 * torch.eye(classes, dim)
    y = torch.arange(classes).repeat_interleave(n)
    return centres[y] + 0.5 * torch.randn(len(y), dim, generator=g), y


def test_logistic_regression_recovers_a_separable_problem():
    (x, y), (x_test, y_test) = blobs(30, 0), blobs(30, 1)
    x, x_test = x.double(), x_test.double()
    weight, bias = transfer.fit_logistic(x, y, 3, lam=1e-3)
    assert transfer.top1(x @ weight + bias, y) == 100 and transfer.top1(x_test @ weight + bias, y_test) == 100
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    grads = torch.autograd.grad(transfer.probe_loss(x, y, w, b, 1e-3), [w, b])
    assert max(g.abs().max().item() for g in grads) < 1e-5  # converged: the gradient of the convex loss vanishes
    # by hand: the gradient is X^T (softmax - onehot) / N + lam W, and the bias' its column sums
    residual = (torch.softmax(x @ weight + bias, 1) - torch.nn.functional.one_hot(y, 3)) / len(x)
    assert torch.allclose(x.T @ residual + 1e-3 * weight, grads[0], atol=1e-10)
    strong, _ = transfer.fit_logistic(x, y, 3, lam=10.0)
    assert strong.norm() < weight.norm() / 5  # a stronger penalty, smaller weights


def test_wd_search_picks_by_validation_and_retrains_on_train_plus_val(monkeypatch):
    """A stand-in fit whose 'model' is the wd it was given (lambda x n), and a validation score that
    peaks at grid[3]. Each fit on n images gets lambda = wd / n (scikit-learn's C = 1/wd on the
    summed loss): the search n = 8 (train), the retrain n = 10 (train + val) with the same wd."""
    grid = transfer.wd_grid(9)
    assert len(transfer.wd_grid(45)) == 45 and transfer.wd_grid(45)[0] == pytest.approx(1e-6)
    assert transfer.wd_grid(45)[-1] == pytest.approx(1e5) and transfer.wd_grid(45)[4] == pytest.approx(1e-5)
    calls = []

    def fake_fit(x, y, num_classes, lam, max_iter=1000, init=None):
        calls.append((len(x), lam))
        return torch.full((x.shape[1], num_classes), lam * len(x), dtype=x.dtype), torch.zeros(num_classes, dtype=x.dtype)

    def fake_metric(scores, y):  # the validation score of wd: highest at grid[3], two ties elsewhere
        wd = scores[0, 0].item()
        return {3: 90.0, 5: 80.0, 6: 80.0}.get(min(range(9), key=lambda i: abs(grid[i] - wd)), 10.0)

    monkeypatch.setattr(transfer, "fit_logistic", fake_fit)
    monkeypatch.setitem(transfer.METRICS, "fake", fake_metric)
    ones = lambda n: (torch.ones(n, 1), torch.zeros(n, dtype=torch.long))
    result = transfer.probe(ones(8), ones(2), ones(4), 2, "fake", grid)
    assert result["best_wd"] == grid[3] and result["lambda"] == grid[3] / 10 and result["val_score"] == 90.0
    assert result["val_scores"] == [10, 10, 10, 90, 10, 80, 80, 10, 10]
    assert sorted(calls[:-1], key=lambda c: c[1]) == [(8, wd / 8) for wd in grid]  # the search: train only
    assert calls[-1] == (10, grid[3] / 10)  # the retrain: train + val with the best wd
    # ties go to the stronger wd
    monkeypatch.setitem(transfer.METRICS, "fake", lambda s, y: 80.0 if abs(s[0, 0].item() - grid[3]) > 1e-12 * grid[3] else 10.0)
    assert transfer.probe(ones(8), ones(2), ones(4), 2, "fake", grid)["best_wd"] == grid[-1]


def test_real_search_and_retrain():
    (x, y), (xv, yv), (xt, yt) = blobs(20, 0, dim=8), blobs(10, 1, dim=8), blobs(10, 2, dim=8)
    y[::5] = (y[::5] + 1) % 3  # some label noise: the penalty matters
    grid = transfer.wd_grid(5)
    result = transfer.probe((x, y), (xv, yv), (xt, yt), 3, "top1", grid, max_iter=200)
    assert result["best_wd"] in grid and result["val_score"] == max(result["val_scores"])
    assert result["lambda"] == result["best_wd"] / 90 and result["weight"].dtype == torch.float64
    weight, bias = transfer.fit_logistic(torch.cat([x, xv]).double(), torch.cat([y, yv]), 3, result["lambda"], 200)
    assert torch.equal(weight, result["weight"]) and torch.equal(bias, result["bias"])
    assert result["test_score"] == transfer.top1(xt.double() @ weight + bias, yt) > 90


def test_fit_reaches_the_optimum_of_a_problem_solved_by_hand():
    """Two classes on one feature: x = +c is class 0 with share p = 0.8, x = -c mirrors it (c = 5: the
    fit's rescaling by the row norm is at work). By symmetry W = (a, -a) and equal biases, and the
    mean loss p log(1 + e^-2ac) + (1 - p) log(1 + e^2ac) + lam a^2 is least where
    p sigma(-2ac) - (1 - p) sigma(2ac) = lam a / c: bisection in Python floats."""
    c = 5.0
    x = torch.tensor([c] * 50 + [-c] * 50)[:, None]  # float32 features, as extracted
    y = torch.tensor([0] * 40 + [1] * 10 + [1] * 40 + [0] * 10)
    p, wd = 0.8, 10.0
    result = transfer.probe((x, y), (x, y), (x, y), 2, "top1", [wd])  # train == val: the retrain has n = 200
    lam = wd / 200
    sigma = lambda t: 1 / (1 + math.exp(-t))
    low, high = 0.0, 10.0
    for _ in range(100):
        a = (low + high) / 2
        low, high = (a, high) if p * sigma(-2 * a * c) - (1 - p) * sigma(2 * a * c) > lam * a / c else (low, a)
    weight, bias = result["weight"], result["bias"]
    assert weight[0, 0].item() == pytest.approx(a, abs=1e-7) and weight[0, 1].item() == pytest.approx(-a, abs=1e-7)
    assert bias[0].item() == pytest.approx(bias[1].item(), abs=1e-6)
    assert result["lambda"] == pytest.approx(lam) and result["max_gradient"] <= transfer.TOLERANCE


def relu_features(n, dim, classes, seed):
    """Non-negative, correlated features like a ResNet's pool-5 (float32), and balanced labels."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim ** 0.5
    y = torch.arange(classes).repeat_interleave(n // classes)
    centres = torch.randn(classes, dim, generator=g)
    return torch.relu((centres[y] + 1.5 * torch.randn(len(y), dim, generator=g)) @ mixing), y


def test_probe_fits_in_float64_to_the_gradient_tolerance():
    """On float32 features a float32 L-BFGS stalls with a gradient several times the tolerance; the
    probe fits in float64 and ends at the tolerance, with a lower objective. The gradient is checked
    by hand: X^T (softmax - onehot) / n + lambda W, and its column sums for the bias."""
    x, y = relu_features(300, 64, 5, 0)
    result = transfer.probe((x, y), (x[:50], y[:50]), (x[:50], y[:50]), 5, "top1", [1e-2 * 350])
    lam, weight, bias = 1e-2, result["weight"].double(), result["bias"].double()
    both = torch.cat([x, x[:50]]).double(), torch.cat([y, y[:50]])
    residual = (torch.softmax(both[0] @ weight + bias, 1) - torch.nn.functional.one_hot(both[1], 5)) / len(both[0])
    gradient = torch.cat([both[0].T @ residual + lam * weight, residual.sum(0, keepdim=True)])
    assert gradient.abs().max().item() <= 1e-6  # transfer.TOLERANCE
    assert result["lambda"] == pytest.approx(lam) and result["weight"].dtype == torch.float64
    assert result["max_gradient"] == pytest.approx(gradient.abs().max().item(), rel=1e-6)
    w32, b32 = transfer.fit_logistic(both[0].float(), both[1], 5, lam)
    assert transfer.max_gradient(*both, w32.double(), b32.double(), lam) > 3 * transfer.TOLERANCE
    objective = lambda w, b: transfer.probe_loss(*both, w, b, lam).item()
    assert objective(weight, bias) < objective(w32.double(), b32.double())
    assert result["unconverged_search_fits"] == 0  # fits cut short are counted, not hidden:
    short = transfer.probe((x, y), (x[:50], y[:50]), (x[:50], y[:50]), 5, "top1", [1e-3, 1e-2, 1e-1], max_iter=2)
    assert short["unconverged_search_fits"] == 3 and short["max_gradient"] > transfer.TOLERANCE


def test_metrics_by_hand():
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    scores = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 0]), 3).float()
    assert transfer.top1(scores, y) == pytest.approx(100 * 4 / 6)
    assert transfer.mean_per_class(scores, y) == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    # ranked: + - + -  -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1: 6 levels at 1, 5 at 2/3
    ap = (6 * 1 + 5 * 2 / 3) / 11
    assert transfer.ap11(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False])) == pytest.approx(ap)
    assert transfer.ap11(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([False, True, True])) == pytest.approx(1.0)
    # VOC07 targets: 1 present, 0 absent, -1 ignored ('difficult' only): the ignored image drops out
    labels = torch.tensor([[1, 1], [-1, 1], [0, 0], [1, 0]])
    voc_scores = torch.tensor([[0.9, 0.9], [0.8, 0.8], [0.7, 0.1], [0.6, 0.2]])
    assert transfer.map11(voc_scores, labels) == pytest.approx(100 * (ap + 1.0) / 2)


def test_file_list_loaders_and_missing_data(tmp_path):
    root = tmp_path / "voc2007" / "VOCdevkit" / "VOC2007"
    os.makedirs(root / "ImageSets" / "Main")
    os.makedirs(root / "JPEGImages")
    ids = {"train": ["000005", "000007"], "val": ["000009"], "test": ["000001"]}
    for split, names in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for cls in transfer.VOC_CLASSES:
            flags = {"000005": {"cat": "1", "dog": "0"}, "000007": {"dog": "1"}}
            lines = [f"{n} {flags.get(n, {}).get(cls, '-1')}" for n in names]
            (root / "ImageSets" / "Main" / f"{cls}_{split}.txt").write_text("\n".join(lines) + "\n")
    splits = transfer.voc2007(str(tmp_path / "voc2007"))
    cat, dog = transfer.VOC_CLASSES.index("cat"), transfer.VOC_CLASSES.index("dog")
    train_targets = torch.stack(splits["train"].targets)
    assert train_targets[0, cat] == 1 and train_targets[0, dog] == -1 and train_targets[1, dog] == 1
    assert train_targets.sum() == 1 - 1 + 1 and len(splits["val"]) == len(splits["test"]) == 1
    assert splits["train"].paths[0].endswith("JPEGImages/000005.jpg")

    bird = tmp_path / "birdsnap"
    os.makedirs(bird / "download" / "images" / "Acadian_Flycatcher")
    for name in ("a.jpg", "b.jpg"):
        augment.SyntheticShapes()[0][0].save(bird / "download" / "images" / "Acadian_Flycatcher" / name)
    (bird / "images.txt").write_text("url\tmd5\tpath\tspecies_id\n"
                                     "u\tm\tAcadian_Flycatcher/a.jpg\t1\nu\tm\tAcadian_Flycatcher/b.jpg\t1\n"
                                     "u\tm\tAcadian_Flycatcher/lost.jpg\t1\n")
    (bird / "test_images.txt").write_text("path\nAcadian_Flycatcher/b.jpg\n")
    splits = transfer.birdsnap(str(bird))
    assert (len(splits["train"]), len(splits["test"]), splits["train"].targets) == (1, 1, [0])  # lost.jpg left out
    assert splits["test"][0][0].size == (64, 64)

    args = transfer.parse_args(["--pretrained", "random", "--data-root", str(tmp_path / "empty")])
    with pytest.raises(augment.InputError, match=r"food101 not found.*put it in .*empty/food101/food-101/"):
        transfer.load_splits("food101", args)


def run_transfer(argv, capsys):
    results = transfer.main(argv)
    return results, capsys.readouterr().out


def test_end_to_end_on_a_folder_with_cache(folder, tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    torch.save(lincls.resnet_backbone("resnet18", False)[0].state_dict(), tmp_path / "backbone.pth")
    argv = ["--pretrained", str(tmp_path / "backbone.pth"), "--arch", "resnet18", "--dataset", "folder", "--data", folder,
            "--image-size", "32", "--workers", "0", "--lambdas", "5", "--max-iter", "50",
            "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    results, out = run_transfer(argv, capsys)
    r = results["folder"]
    assert (r["train"], r["val"], r["test"], r["classes"]) == (38, 10, 16, 10)  # a seeded 20% of train validates
    assert r["best_wd"] in transfer.wd_grid(5) and 0 <= r["test_score"] <= 100
    assert "features of 48 train, 16 test images" in out
    rows = list(csv.reader(open(tmp_path / "out" / "transfer.csv")))
    assert rows[0][1:] == [t for t, _, _ in transfer.DATASETS.values()] + ["folder0"]  # Table 4's order
    assert rows[1][1:4] == ["79.4", "92.8", "77.8"] and rows[2][-1] == f"{r['test_score']:.1f}" and rows[2][1] == "-"
    assert open(tmp_path / "out" / "transfer.md").read().startswith("| | Food | CIFAR-10 |")
    # the second run reads the cached features and gives the same numbers
    monkeypatch.setattr(transfer, "extract", lambda *a: pytest.fail("features were not cached"))
    again, out = run_transfer(argv, capsys)
    assert again["folder"]["test_score"] == r["test_score"] and "features of" not in out
    assert len(open(tmp_path / "out" / "results.jsonl").readlines()) == 2


def folder_argv(data, tmp_path, *more):
    return ["--pretrained", "random", "--arch", "resnet18", "--dataset", "folder", "--data", str(data),
            "--image-size", "32", "--workers", "0", "--lambdas", "3", "--max-iter", "50",
            "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"), *more]


def error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        transfer.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_every_split_is_numbered_by_train_classes(folder, tmp_path, capsys):
    """test/ without class 0: its images keep their class indices (1..9), not 0..8 of its own
    folders. A test class with no training images (Birdsnap's species 2 here) cannot be scored."""
    data = shutil.copytree(folder, tmp_path / "data")
    shutil.rmtree(data / "test" / "0")
    splits, _ = transfer.load_splits("folder", transfer.parse_args(folder_argv(data, tmp_path)))
    test = splits["test"].base
    assert test.classes == [str(c) for c in range(10)] and len(test) == 14
    assert test.targets == [int(os.path.basename(os.path.dirname(path))) for path, _ in test.samples]
    assert min(test.targets) == 1 and "test has no images of 1 of the 10 classes: 0" in capsys.readouterr().err
    bird = tmp_path / "birdsnap"
    for species in ("Acadian_Flycatcher", "Least_Tern"):
        os.makedirs(bird / "download" / "images" / species)
        for name in ("a.jpg", "b.jpg"):
            augment.SyntheticShapes()[0][0].save(bird / "download" / "images" / species / name)
    (bird / "images.txt").write_text("url\tmd5\tpath\tspecies_id\n" + "".join(
        f"u\tm\t{species}/{name}\t{i + 1}\n" for i, species in enumerate(("Acadian_Flycatcher", "Least_Tern"))
        for name in ("a.jpg", "b.jpg")))
    (bird / "test_images.txt").write_text("path\nAcadian_Flycatcher/b.jpg\nLeast_Tern/a.jpg\nLeast_Tern/b.jpg\n")
    argv = ["--pretrained", "random", "--arch", "resnet18", "--dataset", "birdsnap", "--data-root", str(tmp_path),
            "--image-size", "32", "--workers", "0", "--lambdas", "2", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / "out")]
    assert "birdsnap: the test split has images of 1 class(es) without training images, which cannot be scored: " \
           "class 1" in error_line(argv, capsys)


def cached_features(tmp_path):
    (path,) = (tmp_path / "cache").rglob("*.pt")
    cached = torch.load(path, weights_only=True)
    return cached.get("features", cached)


def test_cache_is_recomputed_when_the_data_changes(folder, tmp_path, capsys):
    """A test image fixed in place (same name, other pixels): the rerun recomputes the features,
    and that image's row changes while the others stay; an unchanged data set reuses them."""
    data = shutil.copytree(folder, tmp_path / "data")
    argv = folder_argv(data, tmp_path)
    _, out = run_transfer(argv, capsys)
    assert "features of 48 train, 16 test images" in out
    before = cached_features(tmp_path)["test"][0]
    fixed = data / "test" / "3" / "3.png"
    row = [path for path, _ in augment.ImageFiles(str(data / "test")).samples].index(str(fixed))
    shutil.copyfile(data / "test" / "5" / "5.png", fixed)
    _, out = run_transfer(argv, capsys)
    assert "files changed since these features were computed; recomputing" in out
    assert "features of 48 train, 16 test images" in out
    after = cached_features(tmp_path)["test"][0]
    assert not torch.equal(before[row], after[row])
    assert torch.equal(torch.cat([before[:row], before[row + 1:]]), torch.cat([after[:row], after[row + 1:]]))
    _, out = run_transfer(argv, capsys)
    assert "features of" not in out and "recomputing" not in out


def test_skip_bad_images_leaves_them_out(folder, tmp_path, capsys):
    """An unreadable test image: without the flag one error line naming it; with it, the numbers of
    the data set without that file (each readable image counted once) and the count skipped."""
    data = shutil.copytree(folder, tmp_path / "data")
    bad = data / "test" / "3" / "3.png"
    bad.write_bytes(b"not a png")
    assert "3.png" in error_line(folder_argv(data, tmp_path), capsys)
    skipping = transfer.main(folder_argv(data, tmp_path, "--skip-bad-images"))
    warning = [line for line in capsys.readouterr().err.splitlines() if "--skip-bad-images" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: --skip-bad-images: 1 of 16 folder test images cannot "
                                                       "be read and are left out (the first: cannot read image ")
    assert str(bad) in warning[0]
    os.remove(bad)
    clean, _ = run_transfer(folder_argv(data, tmp_path / "clean"), capsys)
    a, b = skipping["folder"], clean["folder"]
    assert (a["test"], a["skipped"], b["test"], b["skipped"]) == (15, 1, 15, 0)
    assert a["test_score"] == b["test_score"] and a["val_score"] == b["val_score"] and a["best_wd"] == b["best_wd"]


def test_bad_input_is_one_error_line(tmp_path, capsys):
    for argv, message in ((["--datasets", "all", "--data-root", str(tmp_path)], "none of the 12 data sets"),
                          (["--dataset", "dtd", "--data-root", str(tmp_path)], "dtd not found"),
                          (["--dataset", "imagenet"], "unknown --dataset imagenet"),
                          (["--dataset", "folder", "--data", str(tmp_path)], "--dataset folder needs --data DIR")):
        with pytest.raises(SystemExit) as exit_:
            transfer.main(["--pretrained", "random", "--arch", "resnet18", "--output-dir", str(tmp_path / "out")] + argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not any(tmp_path.iterdir())  # no output folder, and looking for the data sets made no folders


def test_real_cifar10_images(cifar10, tmp_path, capsys):
    """The real CIFAR-10 subset (500 train, 200 test): a random ResNet's features already
    classify above chance (10%)."""
    results, out = run_transfer(["--pretrained", "random", "--arch", "resnet18", "--dataset", "folder", "--data", cifar10,
                                 "--image-size", "32", "--workers", "0", "--lambdas", "5", "--max-iter", "100",
                                 "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path)], capsys)
    r = results["folder"]
    assert (r["train"] + r["val"], r["test"], r["classes"]) == (500, 200, 10)
    assert 15 < r["test_score"] <= 100, out
