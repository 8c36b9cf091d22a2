"""transfer.py: the logistic-regression probe (L-BFGS recovers a separable problem at a stationary
point, the lambda search follows the validation score, the retrain uses train+val), the metrics
against hand computations, the file-list loaders, and end to end on a folder and on real CIFAR-10."""
import csv
import os

import pytest
import torch

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


def test_lambda_search_picks_by_validation_and_retrains_on_train_plus_val(monkeypatch):
    """A stand-in fit whose 'model' is its lambda, and a validation score that peaks at grid[3]."""
    grid = transfer.lambda_grid(9)
    assert len(transfer.lambda_grid(45)) == 45 and transfer.lambda_grid(45)[0] == pytest.approx(1e-6)
    assert transfer.lambda_grid(45)[-1] == pytest.approx(1e5) and transfer.lambda_grid(45)[4] == pytest.approx(1e-5)
    calls = []

    def fake_fit(x, y, num_classes, lam, max_iter=1000, init=None):
        calls.append((len(x), lam))
        return torch.full((x.shape[1], num_classes), lam), torch.zeros(num_classes)

    def fake_metric(scores, y):  # the validation score of lambda: highest at grid[3], two ties elsewhere
        lam = scores[0, 0].item()
        return {3: 90.0, 5: 80.0, 6: 80.0}.get(min(range(9), key=lambda i: abs(grid[i] - lam)), 10.0)

    monkeypatch.setattr(transfer, "fit_logistic", fake_fit)
    monkeypatch.setitem(transfer.METRICS, "fake", fake_metric)
    ones = lambda n: (torch.ones(n, 1), torch.zeros(n, dtype=torch.long))
    result = transfer.probe(ones(8), ones(2), ones(4), 2, "fake", grid)
    assert result["best_lambda"] == grid[3] and result["val_score"] == 90.0
    assert result["val_scores"] == [10, 10, 10, 90, 10, 80, 80, 10, 10]
    assert sorted(calls[:-1], key=lambda c: c[1]) == [(8, lam) for lam in grid]  # the search: train only
    assert calls[-1] == (10, grid[3])  # the retrain: train + val with the best lambda
    # ties go to the stronger lambda
    monkeypatch.setitem(transfer.METRICS, "fake", lambda s, y: 80.0 if abs(s[0, 0].item() - grid[3]) > 1e-12 * grid[3] else 10.0)
    assert transfer.probe(ones(8), ones(2), ones(4), 2, "fake", grid)["best_lambda"] == grid[-1]


def test_real_search_and_retrain():
    (x, y), (xv, yv), (xt, yt) = blobs(20, 0, dim=8), blobs(10, 1, dim=8), blobs(10, 2, dim=8)
    y[::5] = (y[::5] + 1) % 3  # some label noise: the penalty matters
    grid = transfer.lambda_grid(5)
    result = transfer.probe((x, y), (xv, yv), (xt, yt), 3, "top1", grid, max_iter=200)
    assert result["best_lambda"] in grid and result["val_score"] == max(result["val_scores"])
    weight, bias = transfer.fit_logistic(torch.cat([x, xv]), torch.cat([y, yv]), 3, result["best_lambda"], 200)
    assert torch.equal(weight, result["weight"]) and torch.equal(bias, result["bias"])
    assert result["test_score"] == transfer.top1(xt @ weight + bias, yt) > 90


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
    assert r["best_lambda"] in transfer.lambda_grid(5) and 0 <= r["test_score"] <= 100
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
    """The CIFAR-10 copy in ../shared (500 train, 200 test): a random ResNet's features already
    classify above chance (10%)."""
    results, out = run_transfer(["--pretrained", "random", "--arch", "resnet18", "--dataset", "folder", "--data", cifar10,
                                 "--image-size", "32", "--workers", "0", "--lambdas", "5", "--max-iter", "100",
                                 "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path)], capsys)
    r = results["folder"]
    assert (r["train"] + r["val"], r["test"], r["classes"]) == (500, 200, 10)
    assert 15 < r["test_score"] <= 100, out
