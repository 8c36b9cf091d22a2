"""mocov2_asym.py pieces against hand computations: InfoNCE, queue, EMA, MeanEnc, the BN variants,
the learning-rate schedule and the loss of the MultiCrop / --sym pairs."""
import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import mocov2_asym as moco


def test_infonce_matches_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    queue = F.normalize(torch.tensor([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]), dim=1)
    t = 0.2
    expected = 0.0
    for i in range(2):
        pos = sum(q[i, c] * k[i, c] for c in range(2)).item()
        negs = [sum(q[i, c] * queue[j, c] for c in range(2)).item() for j in range(3)]
        expected += -pos / t + math.log(sum(math.exp(s / t) for s in [pos] + negs))
    assert moco.infonce(q, k, queue, t).item() == pytest.approx(expected / 2, rel=1e-6)


def test_queue_enqueue_and_pointer_wrap():
    queue = moco.Queue(6, 2)
    for step in range(4):  # batches of 2 into K=6: the 4th wraps around to the start
        queue.dequeue_and_enqueue(torch.full((2, 2), float(step)))
    assert queue.keys[:, 0].tolist() == [3, 3, 1, 1, 2, 2]
    assert queue.ptr == 2
    restored = moco.Queue(6, 2)
    restored.load_state_dict(queue.state_dict())  # the pointer travels with the checkpoint
    assert restored.ptr == 2 and torch.equal(restored.keys, queue.keys)


def test_momentum_update_is_the_ema_formula_on_parameters_only():
    torch.manual_seed(0)
    source, target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target[1].running_mean.fill_(5.0)
    before = [p.clone() for p in target.parameters()]
    moco.momentum_update(target, source, 0.9)
    for t, b, s in zip(target.parameters(), before, source.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    assert torch.equal(target[1].running_mean, torch.full((4,), 5.0))


def test_mean_enc_is_the_normalised_mean_of_the_views():
    z = torch.randn(3 * 4, 5)  # 3 views of 4 images, view-major
    expected = torch.stack([F.normalize(z[i::4].mean(0), dim=0) for i in range(4)])
    assert torch.allclose(moco.mean_encoding(z, 3), expected, atol=1e-6)
    assert torch.allclose(moco.mean_encoding(z[:4], 1), F.normalize(z[:4], dim=1))


def test_simsiam_std():
    assert moco.simsiam_std(torch.ones(8, 16)) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    assert moco.simsiam_std(torch.randn(4096, 128)) == pytest.approx(1.0, abs=0.02)


def test_split_batchnorm_normalises_each_group():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4) * 3 + 1
    split = augment.SplitBatchNorm(3, splits=3)
    y = split(x)
    for group in range(3):  # sample i is in group i mod 3
        reference = nn.BatchNorm2d(3)
        assert torch.allclose(y[group::3], reference(x[group::3]), atol=1e-5)
    groups_mean = torch.stack([x[g::3].mean((0, 2, 3)) for g in range(3)]).mean(0)
    assert torch.allclose(split.running_mean, 0.1 * groups_mean, atol=1e-6)
    groups_var = torch.stack([x[g::3].transpose(0, 1).flatten(1).var(1) for g in range(3)]).mean(0)
    assert torch.allclose(split.running_var, 0.9 + 0.1 * groups_var, atol=1e-5)
    split.eval()
    assert torch.allclose(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight, split.bias))


def test_global_batchnorm_on_one_process_is_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(10, 6, requires_grad=True)
    ours, bn = augment.GlobalBatchNorm(6), nn.BatchNorm1d(6)
    ours.weight.data.uniform_(), ours.bias.data.uniform_()
    bn.load_state_dict(ours.state_dict())
    y1, y2 = ours(x), bn(x)
    assert torch.allclose(y1, y2, atol=1e-5)
    g1 = torch.autograd.grad((y1 ** 3).sum(), x)[0]
    g2 = torch.autograd.grad((y2 ** 3).sum(), x)[0]
    assert torch.allclose(g1, g2, atol=1e-4)
    assert torch.allclose(ours.running_var, bn.running_var, atol=1e-6)
    assert torch.allclose(ours.running_mean, bn.running_mean, atol=1e-6)


def test_learning_rate_warmup_then_cosine():
    assert moco.learning_rate(0, 100, 10, 1.0) == 0.0
    assert moco.learning_rate(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert moco.learning_rate(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert moco.learning_rate(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert moco.learning_rate(100, 100, 0, 1.0) == pytest.approx(0.0)


def test_placement_flags_resolve_to_the_paper_defaults():
    args = moco.parse_args(["--multicrop", "--scalemix", "--asym-aug", "--asym-bn", "--mean-enc", "2"])
    assert (args.multicrop, args.multicrop_on, args.scalemix_on) == (6, "source", "source")
    assert (args.source_aug, args.target_aug, args.syncbn_on, args.mean_enc) == ("stronger", "weaker", "target", 2)
    args = moco.parse_args(["--multicrop-on", "both", "--scalemix-on", "target", "--syncbn-on", "source",
                            "--target-aug", "stronger"])
    assert (args.multicrop, args.multicrop_on, args.scalemix_on) == (6, "both", "target")
    assert (args.source_aug, args.target_aug, args.syncbn_on) == ("default", "stronger", "source")
    assert moco.parse_args([]).syncbn_on is None and moco.parse_args([]).scalemix_on is None


class Linear(nn.Module):
    """A batch-independent stand-in encoder: list of Nx3xHxW -> list of NxD."""

    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, d)

    def forward(self, views):
        return [self.fc(F.adaptive_avg_pool2d(x, 4).flatten(1)) for x in views]


def step_args(**kw):
    base = dict(mean_enc=1, mean_enc_source=1, multicrop=0, multicrop_per_crop=False, sym=False, temperature=0.2, bn_splits=1)
    return argparse.Namespace(**{**base, **kw})


def test_step_loss_pairs_multicrop_and_sym_by_hand():
    torch.manual_seed(0)
    source, target = Linear(), Linear()
    queue = moco.Queue(16, 8)
    n = 4
    batch = {"source": torch.randn(n, 3, 8, 8), "target": torch.randn(2 * n, 3, 8, 8),
             "source_small": torch.randn(3 * n, 3, 4, 4), "target_small": torch.randn(3 * n, 3, 4, 4)}
    enc = lambda model, x: F.normalize(model([x])[0], dim=1)
    q, k = enc(source, batch["source"]), moco.mean_encoding(target([batch["target"]])[0], 2)
    qs, ks = enc(source, batch["source_small"]).split(n), enc(target, batch["target_small"]).split(n)
    L = lambda a, b: moco.infonce(a, b, queue.keys, 0.2)

    args = step_args(mean_enc=2, multicrop=3)
    only_source = {key: v for key, v in batch.items() if key != "target_small"}
    loss, _, _, keys = moco.train_step(source, target, queue, only_source, args)
    assert loss.item() == pytest.approx((L(q, k) + sum(L(z, k) for z in qs) / 3).item(), rel=1e-5)
    assert torch.allclose(keys, k)
    per_crop, _, _, _ = moco.train_step(source, target, queue, only_source, step_args(mean_enc=2, multicrop=3, multicrop_per_crop=True))
    assert per_crop.item() == pytest.approx(loss.item(), rel=1e-5)  # no BN here: the same loss

    only_target = {key: v for key, v in batch.items() if key != "source_small"}
    loss, _, _, _ = moco.train_step(source, target, queue, only_target, args)
    assert loss.item() == pytest.approx((L(q, k) + sum(L(q, z) for z in ks) / 3).item(), rel=1e-5)

    loss, _, _, _ = moco.train_step(source, target, queue, batch, args)
    both = L(q, k) + sum(L(z, k) for z in qs) / 3 + sum(L(q, z) for z in ks) / 3 + sum(L(a, b) for a in qs for b in ks) / 9
    assert loss.item() == pytest.approx(both.item(), rel=1e-5)

    plain = {"source": batch["source"], "target": batch["target"][:n]}
    loss, _, _, keys = moco.train_step(source, target, queue, plain, step_args(sym=True))
    k1, q2 = enc(target, plain["target"]), enc(source, plain["target"])
    k2 = enc(target, plain["source"])
    assert loss.item() == pytest.approx((L(q, k1) + L(q2, k2)).item(), rel=1e-5)
    assert torch.allclose(keys, torch.cat([k1, k2]))


def test_target_gets_no_gradient():
    args = moco.parse_args(["--arch", "resnet18", "--image-size", "32", "--bn-splits", "2", "--asym-bn"])
    source, target = moco.build_encoders(args, torch.device("cpu"))
    assert all(not p.requires_grad for p in target.parameters())
    assert type(target.projector[1]) is augment.GlobalBatchNorm and type(source.projector[1]) is augment.SplitBatchNorm
    assert type(target.backbone.bn1) is augment.SplitBatchNorm and type(source.backbone.bn1) is augment.SplitBatchNorm  # both emulate 2 devices
    batch = {"source": torch.randn(4, 3, 32, 32), "target": torch.randn(4, 3, 32, 32)}
    loss, _, _, _ = moco.train_step(source, target, moco.Queue(8, 128), batch, step_args())
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in source.parameters())


@pytest.mark.parametrize("flags,expected", [
    ([], {"source": (1, 3, 32, 32), "target": (1, 3, 32, 32)}),
    (["--multicrop", "2"], {"source": (1, 3, 32, 32), "target": (1, 3, 32, 32), "source_small": (2, 3, 16, 16)}),
    (["--multicrop-on", "target"], {"source": (1, 3, 32, 32), "target": (1, 3, 32, 32), "target_small": (6, 3, 16, 16)}),
    (["--mean-enc", "2", "--mean-enc-source", "3"], {"source": (3, 3, 32, 32), "target": (2, 3, 32, 32)}),
])
def test_flags_reach_the_views(flags, expected):
    views = moco.make_views(moco.parse_args(["--image-size", "32"] + flags))
    image = moco.augment.SyntheticShapes("train")[0][0]
    assert {k: tuple(v.shape) for k, v in views(image).items()} == expected


def test_design_flags_choose_the_view_recipes():
    views = moco.make_views(moco.parse_args(["--image-size", "224", "--asym-aug", "--scalemix"]))
    source_ops = [type(t).__name__ for t in views.transforms["source"].transforms]
    target_ops = [type(t).__name__ for t in views.transforms["target"].transforms]
    assert "RandAugment" in source_ops and "GaussianBlur" not in str(target_ops)
    assert target_ops == ["RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    assert views.scalemix_on == "source"


def knn_by_hand(bank, bank_labels, test, k, t, n_classes):
    bank, test = F.normalize(bank, dim=1), F.normalize(test, dim=1)
    predictions = []
    for x in test:
        sims = sorted(((float(x @ b), int(y)) for b, y in zip(bank, bank_labels)), reverse=True)[:k]
        scores = [sum(math.exp(s / t) for s, y in sims if y == c) for c in range(n_classes)]
        predictions.append(max(range(n_classes), key=lambda c: scores[c]))
    return predictions


def test_knn_accuracy_matches_hand_computation():
    torch.manual_seed(0)
    bank, bank_labels = torch.randn(40, 6), torch.randint(0, 3, (40,))
    test, test_labels = torch.randn(25, 6), torch.randint(0, 3, (25,))
    args = argparse.Namespace(knn_k=5, knn_t=0.1, channels_last=False, amp="off")
    identity = nn.Flatten()  # the "backbone": features are the inputs themselves
    batches = lambda x, y: list(zip(x.split(7), y.split(7)))
    got = augment.knn_accuracy(identity, batches(bank, bank_labels), batches(test, test_labels), torch.device("cpu"), args)
    predictions = knn_by_hand(bank, bank_labels, test, 5, 0.1, 3)
    expected = 100 * sum(p == int(y) for p, y in zip(predictions, test_labels)) / 25
    assert got == pytest.approx(expected)
    args.knn_k = 200  # more neighbours than the bank holds: all of them
    got = augment.knn_accuracy(identity, batches(bank, bank_labels), batches(test, test_labels), torch.device("cpu"), args)
    predictions = knn_by_hand(bank, bank_labels, test, 40, 0.1, 3)
    assert got == pytest.approx(100 * sum(p == int(y) for p, y in zip(predictions, test_labels)) / 25)
