"""simsiam_asym.py against hand computations: the -cos loss, the asymmetric and --sym steps
(MultiCrop, MeanEnc), the projector / predictor layout, the clone target, the predictor's fixed
learning rate, and 1 process == 2 processes."""
import math

import pytest
import torch
import torch.nn as nn

import simsiam_asym as simsiam
from conftest import Scale, read_log
from test_distributed import spawn

TINY = ["--arch", "resnet18", "--image-size", "32", "--dim", "16", "--proj-dim", "32", "--pred-dim", "8"]


def test_simsiam_loss_by_hand():
    p = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 2.0], [3.0, 4.0], [-2.0, -2.0]])
    cosines = [0.0, 1.0, -1.0]  # orthogonal; parallel; opposite
    assert simsiam.simsiam_loss(p, z).item() == pytest.approx(-sum(cosines) / 3, abs=1e-7)
    angle = torch.tensor([[math.cos(0.3), math.sin(0.3)]])
    assert simsiam.simsiam_loss(angle * 5, torch.tensor([[2.0, 0.0]])).item() == pytest.approx(-math.cos(0.3), rel=1e-6)


def step_args(m=0, n_t=1, sym=False):
    return simsiam.parse_args(["--multicrop", str(m), "--mean-enc", str(n_t)] + (["--sym"] if sym else []))


def D(p, z):
    """The paper's D(p, z) = -p/||p|| . z/||z|| for one image, by hand."""
    p, z = p.detach().tolist(), z.detach().tolist()
    dot = sum(a * b for a, b in zip(p, z))
    return -dot / (math.sqrt(sum(a * a for a in p)) * math.sqrt(sum(b * b for b in z)))


def clone_pair():
    source, target = Scale(predictor=True), Scale(predictor=False)
    target.projector.weight.data = source.projector.weight.data.clone()  # the clone: same weights
    return source, target


def test_asymmetric_step_with_multicrop_and_mean_enc_by_hand():
    torch.manual_seed(0)
    source, target = clone_pair()
    n, m, n_t = 2, 2, 2
    batch = {"source": torch.randn(n, 1, 2, 2), "target": torch.randn(n_t * n, 1, 2, 2),
             "source_small": torch.randn(m * n, 1, 2, 2)}
    loss, p, z = simsiam.train_step(source, target, batch, step_args(m, n_t))
    P, W = source.predictor.weight, source.projector.weight
    enc = lambda x: W @ x.flatten()
    expected = 0.0
    for i in range(n):
        z_i = (enc(batch["target"][i]) + enc(batch["target"][n + i])) / 2  # MeanEnc before normalising
        expected += D(P @ enc(batch["source"][i]), z_i) / n
        expected += sum(D(P @ enc(batch["source_small"][j * n + i]), z_i) for j in range(m)) / m / n
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert p.shape == z.shape == (n, 3)
    loss.backward()
    assert source.predictor.weight.grad is not None and target.projector.weight.grad is None  # stop-gradient


def test_sym_is_the_original_half_sum_of_both_directions():
    torch.manual_seed(1)
    source, target = clone_pair()
    n = 3
    batch = {"source": torch.randn(n, 1, 2, 2), "target": torch.randn(n, 1, 2, 2)}
    asym, _, _ = simsiam.train_step(source, target, batch, step_args())
    sym, _, _ = simsiam.train_step(source, target, batch, step_args(sym=True))
    P, W = source.predictor.weight, source.projector.weight
    enc = lambda x: W @ x.flatten()
    x1, x2 = batch["source"], batch["target"]
    d12 = sum(D(P @ enc(x1[i]), enc(x2[i])) for i in range(n)) / n  # D(p1, z2): the asymmetric pair
    d21 = sum(D(P @ enc(x2[i]), enc(x1[i])) for i in range(n)) / n  # D(p2, z1): the mirrored pair
    assert asym.item() == pytest.approx(d12, rel=1e-5)
    assert sym.item() == pytest.approx(0.5 * (d12 + d21), rel=1e-5)


def test_projector_predictor_layout_and_zero_init_residual():
    args = simsiam.parse_args(TINY)
    source, target = simsiam.build_encoders(args, torch.device("cpu"))
    linears = [l for l in source.projector if isinstance(l, nn.Linear)]
    norms = [l for l in source.projector if isinstance(l, nn.BatchNorm1d)]
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 32), (32, 32), (32, 16)]
    assert all(l.bias is None for l in linears) and len(norms) == 3
    assert [bn.affine for bn in norms] == [True, True, False]  # the last BN has no scale or shift
    assert sum(isinstance(l, nn.ReLU) for l in source.projector) == 2 and isinstance(source.projector[-1], nn.BatchNorm1d)
    first, last = source.predictor[0], source.predictor[-1]
    assert (first.in_features, first.out_features, first.bias) == (16, 8, None)
    assert (last.in_features, last.out_features) == (8, 16) and last.bias is not None
    assert isinstance(target.predictor, nn.Identity)
    assert all(torch.equal(p, source.get_parameter(n)) for n, p in target.named_parameters())
    assert torch.all(source.backbone.layer1[0].bn2.weight == 0)  # zero_init_residual
    assert simsiam.parse_args([]).proj_dim == 0 and simsiam.Encoder(args, False).projector[0].in_features == 512


def test_clone_equals_the_source_after_the_update():
    args = simsiam.parse_args(TINY + ["--amp", "off"])
    source, target = simsiam.build_encoders(args, torch.device("cpu"))
    optimizer = torch.optim.SGD(simsiam.param_groups(source, args), lr=0.5, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.randn(8, 3, 32, 32, generator=g), "target": torch.randn(8, 3, 32, 32, generator=g)}
    for _ in range(2):
        loss, _, _ = simsiam.train_step(source, target, batch, args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert not all(torch.equal(p, source.get_parameter(n)) for n, p in target.named_parameters())
        simsiam.momentum_update(target, source, 0.0)
        assert all(torch.equal(p, source.get_parameter(n)) for n, p in target.named_parameters())  # bit for bit
    assert all(not p.requires_grad and p.grad is None for p in target.parameters())


def test_fixed_predictor_lr_stays_at_the_peak_while_the_rest_follows_the_schedule(folder, tmp_path):
    """48 images, batch 16, 1 epoch: 3 steps; the 2nd step's scheduled lr is 0.75 x the peak."""
    simsiam.main(TINY + ["--data", folder, "--batch-size", "16", "--epochs", "1", "--max-steps", "2", "--workers", "0",
                         "--knn-every", "-1", "--print-freq", "1", "--lr", "0.4", "--output-dir", str(tmp_path)])
    peak = 0.4 * 16 / 256
    assert [r["lr"] for r in read_log(tmp_path) if "lr" in r] == pytest.approx([peak, 0.75 * peak])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["fix_lr"] for g in groups] == [False, True]
    assert groups[0]["lr"] == pytest.approx(0.75 * peak) and groups[1]["lr"] == pytest.approx(peak)
    predictor = [n for n in ckpt["source"] if n.startswith("predictor.") and "running" not in n and "batches" not in n]
    assert len(groups[1]["params"]) == len(predictor) == 5  # Linear, BN weight and bias, Linear weight and bias
    source, _ = simsiam.build_encoders(simsiam.parse_args(TINY + ["--no-fix-pred-lr"]), torch.device("cpu"))
    off = simsiam.param_groups(source, simsiam.parse_args(["--no-fix-pred-lr"]))
    assert [g["fix_lr"] for g in off] == [False, False]  # every group follows the schedule
    assert sum(len(g["params"]) for g in off) == len(list(source.parameters()))


# ---- 1 process with the global batch == 2 processes with half each ---------------------------
def first_loss():
    args = simsiam.parse_args(TINY + ["--batch-size", "8", "--workers", "0", "--multicrop", "2", "--mean-enc", "2",
                                      "--sym", "--global-bn"])
    source, target = simsiam.build_encoders(args, torch.device("cpu"))  # --global-bn: every BN global
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in [*source.modules(), *target.modules()])
    train_set = simsiam.augment.dataset("synthetic", "train", simsiam.make_views(args), seed=args.seed)
    batch, _ = next(iter(simsiam.train_loader(train_set, 0, 0, args)))
    loss, _, _ = simsiam.train_step(source, target, batch, args)
    loss.backward()
    grads = torch.cat([source.projector[0].weight.grad.flatten(), source.predictor[0].weight.grad.flatten()])
    if simsiam.world_size() > 1:  # DDP would average the gradients and the logged losses
        torch.distributed.all_reduce(grads)
        grads /= simsiam.world_size()
        loss = loss.detach().clone()
        torch.distributed.all_reduce(loss)
        loss /= simsiam.world_size()
    return {"loss": loss.detach(), "grad": grads}


def _first_loss(rank):
    return first_loss()


def test_two_processes_with_half_batches_equal_one_with_the_whole():
    torch.set_num_threads(1)
    one = first_loss()
    two = spawn(_first_loss)
    assert torch.allclose(two[0]["loss"], one["loss"], rtol=1e-5), (one["loss"], two[0]["loss"])
    assert (two[0]["grad"] - one["grad"]).abs().max() < 1e-3 * one["grad"].abs().max(), (two[0]["grad"] - one["grad"]).abs().max()
