"""Two processes (gloo) against one: shuffled BN unshuffles, AsymBN's statistics are the global
batch's, the loss of the first steps does not depend on how the global batch is split, and the
sharded kNN monitor equals one process's."""
import argparse
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import augment
import mocov2_asym as moco
from conftest import spawn


# ---- shuffled BN -----------------------------------------------------------------------------
class CenterBatch(nn.Module):
    """An 'encoder' whose output depends on its batch: x minus the batch mean."""

    def forward(self, views):
        return [x.flatten(1) - x.flatten(1).mean(0) for x in views]


def global_images():
    return torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))


def _shuffle(rank):
    x = global_images()[4 * rank:4 * rank + 4]
    torch.manual_seed(123)
    out = moco.target_encode(CenterBatch(), x)
    torch.manual_seed(123)
    order = torch.randperm(8)  # the permutation rank 0 drew and broadcast
    return {"out": out, "order": order}


def test_shuffled_bn_encodings_come_back_to_their_images():
    results = spawn(_shuffle)
    flat = global_images().flatten(1)
    order = results[0]["order"]
    expected = torch.empty_like(flat)
    for group in order.view(2, 4):  # each process normalised one random half of the global batch
        expected[group] = flat[group] - flat[group].mean(0)
    got = torch.cat([r["out"] for r in results])
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got[:4], flat[:4] - flat[:4].mean(0))  # a shuffle really happened


# ---- AsymBN ----------------------------------------------------------------------------------
def bn_args(syncbn_on, group_size=0):
    args = moco.parse_args(["--arch", "resnet18", "--image-size", "32", "--syncbn-group-size", str(group_size)])
    args.syncbn_on = syncbn_on
    return args


def projector_input():
    return torch.randn(8, 512, generator=torch.Generator().manual_seed(1)) * 2 + 1


def _asym_bn(rank, syncbn_on, group_size=0):
    source, target = moco.build_encoders(bn_args(syncbn_on, group_size), torch.device("cpu"))
    h = projector_input()[4 * rank:4 * rank + 4].requires_grad_()
    z_source = source.projector(h)
    (z_source ** 2).sum().backward()
    return {"source": z_source.detach(), "target": target.projector(h.detach()), "grad": h.grad,
            "source_mean": source.projector[1].running_mean, "target_mean": target.projector[1].running_mean}


@pytest.mark.parametrize("syncbn_on", ["target", "both"])
def test_asym_bn_target_uses_global_statistics_source_keeps_its_own(syncbn_on):
    results = spawn(_asym_bn, syncbn_on)
    source, target = moco.build_encoders(bn_args(None), torch.device("cpu"))  # plain BN, one process
    h = projector_input()
    whole = target.projector(h)  # BN over the whole global batch
    assert torch.allclose(torch.cat([r["target"] for r in results]), whole, atol=1e-4)
    assert torch.allclose(results[0]["target_mean"], target.projector[1].running_mean, atol=1e-5)
    if syncbn_on == "target":  # the source normalises each process's half on its own
        halves = torch.cat([source.projector(h[:4]), source.projector(h[4:])])
        assert torch.allclose(torch.cat([r["source"] for r in results]), halves, atol=1e-4)
        assert not torch.allclose(halves, whole, atol=1e-2)
    else:  # SyncBN on the source too: outputs and input gradients of the global batch
        h.requires_grad_()
        z = source.projector(h)
        (z ** 2).sum().backward()
        assert torch.allclose(torch.cat([r["source"] for r in results]), z.detach(), atol=1e-4)
        assert torch.allclose(torch.cat([r["grad"] for r in results]), h.grad, atol=1e-4)


def test_syncbn_groups_of_one_process_are_per_process_bn():
    results = spawn(_asym_bn, "target", 1)
    _, target = moco.build_encoders(bn_args(None), torch.device("cpu"))
    h = projector_input()
    halves = torch.cat([target.projector(h[:4]), target.projector(h[4:])])
    assert torch.allclose(torch.cat([r["target"] for r in results]), halves, atol=1e-4)


# ---- the loss does not depend on the split of the global batch -------------------------------
DESIGNS = ["--multicrop", "2", "--mean-enc", "2", "--scalemix", "--asym-aug", "--asym-bn", "--sym",
           "--queue-size", "32", "--batch-size", "8", "--arch", "resnet18", "--image-size", "32", "--workers", "0"]


def two_steps():
    """Two training steps of the script's pieces, with every BN global so that per-process
    statistics (a per-device design choice of MoCo v2) do not enter; -> the two losses."""
    args = moco.parse_args(DESIGNS)
    args.amp = "off"
    source, target = moco.build_encoders(args, torch.device("cpu"))
    source, target = augment.sync_bn(source, None), augment.sync_bn(target, None)
    queue = moco.Queue(args.queue_size, args.dim)
    model = nn.parallel.DistributedDataParallel(source) if moco.world_size() > 1 else source
    optimizer = torch.optim.SGD(source.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    train_set = augment.dataset("synthetic", "train", moco.make_views(args), seed=args.seed)
    losses = []
    for batch, _ in moco.train_loader(train_set, 0, 0, args):
        loss, _, _, keys = moco.train_step(model, target, queue, batch, args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moco.momentum_update(target, source, args.ema)
        queue.dequeue_and_enqueue(keys)
        global_loss = loss.detach().clone()
        if moco.world_size() > 1:
            dist.all_reduce(global_loss)
            global_loss /= moco.world_size()
        losses.append(global_loss.item())
        if len(losses) == 2:
            return torch.tensor(losses)


def _two_steps(rank):
    return {"losses": two_steps()}


def test_two_processes_with_half_batches_equal_one_with_the_whole():
    torch.set_num_threads(1)
    one = two_steps()
    two = spawn(_two_steps)
    assert torch.allclose(two[0]["losses"], two[1]["losses"])
    assert torch.allclose(two[0]["losses"], one, rtol=1e-4), (one, two[0]["losses"])
    assert one[0] != one[1]


# ---- --bn-splits k on one process is k processes' per-device BN ---------------------------------
SPLIT = ["--multicrop", "2", "--mean-enc", "2", "--queue-size", "32", "--batch-size", "8", "--arch", "resnet18",
         "--image-size", "32", "--workers", "0", "--amp", "off"]


def first_step(flags):
    """One training step of the script's pieces with per-device BN as configured; -> the global loss,
    the source's gradients (DDP's mean) and the running statistics of a backbone and a projector BN."""
    args = moco.parse_args(SPLIT + list(flags))
    source, target = moco.build_encoders(args, torch.device("cpu"))
    queue = moco.Queue(args.queue_size, args.dim)
    model = nn.parallel.DistributedDataParallel(source) if moco.world_size() > 1 else source
    train_set = augment.dataset("synthetic", "train", moco.make_views(args), seed=args.seed)
    batch, _ = next(iter(moco.train_loader(train_set, 0, 0, args)))
    torch.manual_seed(7)  # the target's BN shuffle: rank 0's permutation is the one process's
    loss, _, _, _ = moco.train_step(model, target, queue, batch, args)
    loss.backward()
    global_loss = loss.detach().clone()
    if moco.world_size() > 1:
        dist.all_reduce(global_loss)
        global_loss /= moco.world_size()
    stats = {f"{name}.{stat}.{bn}": getattr(getattr(encoder, part)[i] if part == "projector" else encoder.backbone.bn1, stat)
             for name, encoder in (("source", source), ("target", target))
             for bn, part, i in (("bn1", "backbone", None), ("proj", "projector", 1))
             for stat in ("running_mean", "running_var")}
    return {"loss": global_loss, "grads": torch.cat([p.grad.flatten() for p in source.parameters()]), **stats}


PLACEMENTS = {"per-device": [], "asym-bn": ["--asym-bn"], "syncbn-source": ["--syncbn-on", "source"]}


def _first_steps(rank):
    return {name: first_step(flags) for name, flags in PLACEMENTS.items()}


@pytest.fixture(scope="module")
def two_devices():
    """The first step of each placement on two processes (one start of the two)."""
    return spawn(_first_steps)


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_bn_splits_on_one_process_is_per_device_bn_of_two(name, two_devices):
    """MoCo v2's official BN is per device for source and target alike (shuffled on the target):
    --bn-splits 2 on one process gives the loss and gradients of two processes with the same global
    batch, SyncBN placements included; its running statistics are the mean of the two devices'."""
    torch.set_num_threads(1)
    one = first_step(PLACEMENTS[name] + ["--bn-splits", "2"])
    two = [two_devices[0][name], two_devices[1][name]]
    torch.testing.assert_close(one["loss"], two[0]["loss"], rtol=1e-5, atol=1e-6)
    assert ((one["grads"] - two[0]["grads"]).norm() / two[0]["grads"].norm()).item() < 1e-4  # float32 sums, 11M values
    for key in one:
        if "running" in key:
            torch.testing.assert_close(one[key], (two[0][key] + two[1][key]) / 2, rtol=1e-4, atol=1e-6, msg=key)
    whole = first_step(PLACEMENTS[name])  # one process, one BN batch: another loss and gradient, so the splits matter
    assert abs(whole["loss"].item() - one["loss"].item()) > 1e-3
    assert ((whole["grads"] - one["grads"]).norm() / one["grads"].norm()).item() > 1e-2


# ---- kNN monitor: sharded bank and test set ----------------------------------------------------
def knn_data():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(41, 6, generator=g), torch.randint(0, 4, (41,), generator=g),
            torch.randn(25, 6, generator=g), torch.randint(0, 4, (25,), generator=g))


def knn(rank, world):
    bank, bank_labels, test, test_labels = knn_data()
    shard = lambda x: x[rank::world]  # uneven shards, as eval_loader makes them
    batches = lambda x, y: list(zip(shard(x).split(8), shard(y).split(8)))
    args = argparse.Namespace(knn_k=7, knn_t=0.1, channels_last=False, amp="off")
    return augment.knn_accuracy(nn.Flatten(), batches(bank, bank_labels), batches(test, test_labels), torch.device("cpu"),
                                args)


def _knn(rank):
    return {"top1": torch.tensor(knn(rank, 2))}


def test_knn_over_two_shards_equals_one_process():
    results = spawn(_knn)
    assert results[0]["top1"].item() == results[1]["top1"].item() == pytest.approx(knn(0, 1))
