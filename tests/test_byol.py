"""byol_asym.py against hand computations: the 2 - 2cos loss, the asymmetric and --sym steps
(MultiCrop, MeanEnc), the predictor only on the source, and 1 process == 2 processes."""
import math

import pytest
import torch
import torch.nn as nn

import byol_asym as byol
from conftest import Scale
from test_distributed import spawn


def test_byol_loss_by_hand():
    p = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    z = torch.tensor([[0.0, 2.0], [3.0, 4.0]])
    cosines = [0.0, 1.0]  # orthogonal; parallel
    assert byol.byol_loss(p, z).item() == pytest.approx(sum(2 - 2 * c for c in cosines) / 2)
    angle = torch.tensor([[math.cos(0.3), math.sin(0.3)]])
    assert byol.byol_loss(angle * 5, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(2 - 2 * math.cos(0.3), rel=1e-6)


def step_args(m=0, n_t=1, sym=False):
    return byol.parse_args(["--multicrop", str(m), "--mean-enc", str(n_t)] + (["--sym"] if sym else []))


def cos_loss(a, b):
    a, b = a.detach(), b.detach()
    return 2 - 2 * float(a @ b / (a.norm() * b.norm()))


def test_asymmetric_step_with_multicrop_and_mean_enc_by_hand():
    torch.manual_seed(0)
    source, target = Scale(predictor=True), Scale(predictor=False)
    target.projector.weight.data = source.projector.weight.data.clone()
    n, m, n_t = 2, 2, 2
    batch = {"source": torch.randn(n, 1, 2, 2), "target": torch.randn(n_t * n, 1, 2, 2),
             "source_small": torch.randn(m * n, 1, 2, 2)}
    loss, p, z = byol.train_step(source, target, batch, step_args(m, n_t))
    P, W = source.predictor.weight, source.projector.weight
    enc = lambda x: W @ x.flatten()
    expected = 0.0
    for i in range(n):
        z_i = (enc(batch["target"][i]) + enc(batch["target"][n + i])) / 2  # MeanEnc before normalising
        expected += cos_loss(P @ enc(batch["source"][i]), z_i) / n
        expected += sum(cos_loss(P @ enc(batch["source_small"][j * n + i]), z_i) for j in range(m)) / m / n
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert p.shape == z.shape == (n, 3)


def test_multicrop_on_both_adds_every_pair_of_small_crops_by_hand():
    """--multicrop-on both: standard pair + mean over (small source, target) + mean over (source,
    small target) + mean over all m x m (small source, small target) pairs."""
    torch.manual_seed(2)
    source, target = Scale(predictor=True), Scale(predictor=False)
    n, m = 3, 2
    batch = {"source": torch.randn(n, 1, 2, 2), "target": torch.randn(n, 1, 2, 2),
             "source_small": torch.randn(m * n, 1, 2, 2), "target_small": torch.randn(m * n, 1, 2, 2)}
    args = byol.parse_args(["--multicrop", str(m), "--multicrop-on", "both"])
    loss, _, _ = byol.train_step(source, target, batch, args)
    P, W, Wt = source.predictor.weight, source.projector.weight, target.projector.weight
    p = lambda x: P @ W @ x.flatten()
    z = lambda x: Wt @ x.flatten()
    small = lambda kind, j, i: batch[kind][j * n + i]  # view-major: crop j of image i
    expected = sum(cos_loss(p(batch["source"][i]), z(batch["target"][i])) for i in range(n)) / n
    expected += sum(cos_loss(p(small("source_small", j, i)), z(batch["target"][i])) for i in range(n) for j in range(m)) / (m * n)
    expected += sum(cos_loss(p(batch["source"][i]), z(small("target_small", j, i))) for i in range(n) for j in range(m)) / (m * n)
    expected += sum(cos_loss(p(small("source_small", a, i)), z(small("target_small", b, i)))
                    for i in range(n) for a in range(m) for b in range(m)) / (m * m * n)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_sym_adds_the_mirrored_pair():
    torch.manual_seed(1)
    source, target = Scale(predictor=True), Scale(predictor=False)
    batch = {"source": torch.randn(3, 1, 2, 2), "target": torch.randn(3, 1, 2, 2)}
    asym, _, _ = byol.train_step(source, target, batch, step_args())
    sym, _, _ = byol.train_step(source, target, batch, step_args(sym=True))
    mirrored, _, _ = byol.train_step(source, target, {"source": batch["target"], "target": batch["source"]}, step_args())
    assert sym.item() == pytest.approx(asym.item() + mirrored.item(), rel=1e-6)


def test_predictor_only_on_the_source():
    args = byol.parse_args(["--arch", "resnet18", "--dim", "8", "--mlp-dim", "16"])
    source, target = byol.build_encoders(args, torch.device("cpu"))
    assert isinstance(target.predictor, nn.Identity) and isinstance(source.predictor, nn.Sequential)
    assert all(torch.equal(p, source.get_parameter(n)) for n, p in target.named_parameters())
    assert source.projector[3].bias is None  # BYOL's last layer: no bias


# ---- 1 process with the global batch == 2 processes with half each ---------------------------
def first_loss():
    args = byol.parse_args(["--arch", "resnet18", "--image-size", "32", "--dim", "16", "--mlp-dim", "32",
                            "--batch-size", "8", "--workers", "0", "--multicrop", "2", "--mean-enc", "2", "--sym"])
    source, target = byol.build_encoders(args, torch.device("cpu"))
    source, target = byol.augment.sync_bn(source, None), byol.augment.sync_bn(target, None)  # all BN global (see test_distributed)
    train_set = byol.augment.dataset("synthetic", "train", byol.make_views(args), seed=args.seed)
    batch, _ = next(iter(byol.train_loader(train_set, 0, 0, args)))
    loss, _, _ = byol.train_step(source, target, batch, args)
    loss.backward()
    grad = source.projector[0].weight.grad.clone()
    if byol.world_size() > 1:  # DDP would average the gradients and the logged losses
        torch.distributed.all_reduce(grad)
        grad /= byol.world_size()
        loss = loss.detach().clone()
        torch.distributed.all_reduce(loss)
        loss /= byol.world_size()
    return {"loss": loss.detach(), "grad": grad}


def _first_loss(rank):
    return first_loss()


def test_two_processes_with_half_batches_equal_one_with_the_whole():
    torch.set_num_threads(1)
    one = first_loss()
    two = spawn(_first_loss)
    assert torch.allclose(two[0]["loss"], one["loss"], rtol=1e-5), (one["loss"], two[0]["loss"])
    assert (two[0]["grad"] - one["grad"]).abs().max() < 1e-3 * one["grad"].abs().max(), (two[0]["grad"] - one["grad"]).abs().max()


def test_bottleneck_blocks_start_as_the_identity_basic_blocks_do_not():
    """DeepMind's BYOL builds haiku's ResNet BlockV1: each bottleneck block's last BN scale starts
    at 0 (ResNet-50 and deeper); basic blocks (ResNet-18/34) have no such initialisation."""
    for arch, zero in (("resnet50", True), ("resnet18", False)):
        encoder = byol.Encoder(byol.parse_args(["--arch", arch, "--dim", "8", "--mlp-dim", "16"]), predictor=True)
        last = [block.bn3 if zero else block.bn2 for block in encoder.backbone.modules()
                if type(block).__name__ in ("Bottleneck", "BasicBlock")]
        assert len(last) == (16 if zero else 8)
        assert all(torch.all(bn.weight == (0.0 if zero else 1.0)) for bn in last), arch
