"""barlow_asym.py against hand computations: the Barlow Twins loss (explicit loops for the
cross-correlation and the sum), the asymmetric step with MultiCrop and MeanEnc and the --sym step,
the projector, the learning-rate schedule and the biases' learning rate, and 1 process == 2
processes in loss and gradient."""
import math
import os

import pytest
import torch
import torch.nn as nn

import barlow_asym as barlow
from conftest import free_port, pool, read_log
from test_distributed import spawn

LAMBD = 0.0051
EPS = 1e-5  # BatchNorm's


# ---- the loss by hand: explicit loops ----------------------------------------------------------
def bn_by_hand(z):
    """Each column minus its batch mean, over its (biased) batch std."""
    n, d = z.shape
    columns = []
    for j in range(d):
        mean = sum(z[b, j] for b in range(n)) / n
        var = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
        columns.append(torch.stack([(z[b, j] - mean) / torch.sqrt(var + EPS) for b in range(n)]))
    return torch.stack(columns, dim=1)


def by_hand(z_s, z_t, lambd=LAMBD):
    """c_ij = sum_b BN(z_s)_bi BN(z_t)_bj / N; sum_i (1 - c_ii)^2 + lambd sum_{i != j} c_ij^2."""
    a, b = [bn_by_hand(torch.stack(z) if isinstance(z, list) else z) for z in (z_s, z_t)]  # NxD
    n, d = a.shape
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss = loss + ((1 - c_ij) ** 2 if i == j else lambd * c_ij ** 2)
    return loss


def encodings(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3 + 1, torch.randn(n, d, generator=g)


def test_loss_by_hand():
    z_s, z_t = encodings()
    for lambd in (LAMBD, 0.5):
        assert barlow.barlow_loss(z_s, z_t, lambd).item() == pytest.approx(by_hand(z_s, z_t, lambd).item(), rel=1e-5)
    # perfectly correlated, decorrelated features: c = I, loss 0 (up to BN's eps)
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert barlow.barlow_loss(z, 5 * z + 2, LAMBD).item() == pytest.approx(0.0, abs=1e-4)
    # symmetric in the two views: swapping them transposes c
    assert barlow.barlow_loss(z_t, z_s, LAMBD).item() == pytest.approx(barlow.barlow_loss(z_s, z_t, LAMBD).item(), rel=1e-6)


def test_loss_gradient_by_hand():
    z_s, z_t = encodings(seed=1)
    z_s.requires_grad_(), z_t.requires_grad_()
    barlow.barlow_loss(z_s, z_t, LAMBD).backward()
    h_s, h_t = z_s.detach().clone().requires_grad_(), z_t.detach().clone().requires_grad_()
    by_hand(h_s, h_t).backward()
    assert torch.allclose(z_s.grad, h_s.grad, atol=1e-5) and torch.allclose(z_t.grad, h_t.grad, atol=1e-5)


# ---- the steps: a linear stand-in encoder ----------------------------------------------------
class Linear(nn.Module):
    """Flattens each view and multiplies by a fixed matrix: encodings easy to compute by hand."""

    def __init__(self, seed):
        super().__init__()
        self.projector = nn.Linear(4, 3, bias=False)
        torch.nn.init.normal_(self.projector.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, views):
        return [self.projector(x.flatten(1)) for x in views]


def step_args(m=0, n_t=1, sym=False):
    return barlow.parse_args(["--multicrop", str(m), "--mean-enc", str(n_t)] + (["--sym"] if sym else []))


def enc(x, w):
    return [w @ x[i].flatten() for i in range(len(x))]


def test_asymmetric_step_with_multicrop_and_mean_enc_by_hand():
    torch.manual_seed(0)
    source, target = Linear(0), Linear(1)  # other weights on the target: its encodings are the target's
    target.requires_grad_(False)
    n, m, n_t = 5, 2, 2
    batch = {"source": torch.randn(n, 1, 2, 2), "target": torch.randn(n_t * n, 1, 2, 2),
             "source_small": torch.randn(m * n, 1, 2, 2)}
    loss, z_s, z_t = barlow.train_step(source, target, batch, step_args(m, n_t))
    W = source.projector.weight
    t = enc(batch["target"], target.projector.weight)
    z_t_hand = [(t[i] + t[n + i]) / 2 for i in range(n)]  # MeanEnc: the raw encodings' mean, then the loss's BN
    small = enc(batch["source_small"], W)
    expected = by_hand(enc(batch["source"], W), z_t_hand)
    expected = expected + sum(by_hand(small[j * n:(j + 1) * n], z_t_hand) for j in range(m)) / m  # per crop
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert z_s.shape == z_t.shape == (n, 3) and torch.allclose(z_t, torch.stack(z_t_hand), atol=1e-6)
    loss.backward()
    grad = W.grad.clone()
    W.grad = None
    expected.backward()  # the target's encodings are constants: stop-gradient
    assert torch.allclose(grad, W.grad, rtol=1e-4, atol=1e-5)


def test_sym_step_is_the_original_on_the_source_once():
    torch.manual_seed(1)
    source, target = Linear(0), Linear(1)
    target.requires_grad_(False)
    target.projector.weight.zero_()  # unused under --sym
    n, m = 5, 2
    batch = {"source": torch.randn(n, 1, 2, 2), "target": torch.randn(n, 1, 2, 2), "source_small": torch.randn(m * n, 1, 2, 2)}
    loss, _, _ = barlow.train_step(source, target, batch, step_args(m, sym=True))
    W = source.projector.weight
    z2 = enc(batch["target"], W)
    small = enc(batch["source_small"], W)
    expected = by_hand(enc(batch["source"], W), z2)  # once: the loss is symmetric already
    expected = expected + sum(by_hand(small[j * n:(j + 1) * n], [z.detach() for z in z2]) for j in range(m)) / m
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    grad = W.grad.clone()
    W.grad = None
    expected.backward()  # gradients through both views of the main pair
    assert torch.allclose(grad, W.grad, rtol=1e-4, atol=1e-5)


# ---- the encoders, the optimizer -----------------------------------------------------------------
def test_projector_widths_no_biases_last_linear_bare_target_a_clone():
    args = barlow.parse_args(["--arch", "resnet18", "--projector", "16-32-8"])
    source, target = barlow.build_encoders(args, torch.device("cpu"))
    layers = list(source.projector)
    linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
    assert [(l.in_features, l.out_features, l.bias) for l in linears] == [(512, 16, None), (16, 32, None), (32, 8, None)]
    assert [type(layer) for layer in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert all(torch.equal(p, source.get_parameter(n)) for n, p in target.named_parameters())
    assert not any(p.requires_grad for p in target.parameters())
    assert not source.backbone.layer1[0].bn2.weight.any()  # zero_init_residual, as Barlow Twins' ResNet
    bad = barlow.parse_args(["--projector", "64-x"])
    with pytest.raises(barlow.augment.InputError, match="--projector 64-x"):
        barlow.check_args(bad, range(5000))


def test_schedule_is_barlow_twins():
    """Barlow Twins' adjust_learning_rate, written out: linear warm-up, cosine to 0.001 x base."""
    def original(step, total, warmup, base):
        if step < warmup:
            return base * step / warmup
        q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        return base * q + base * 0.001 * (1 - q)
    for step in (0, 3, 10, 11, 57, 99, 100):
        assert barlow.barlow_learning_rate(step, 100, 10, 0.8) == pytest.approx(original(step, 100, 10, 0.8), rel=1e-12)
    assert barlow.barlow_learning_rate(100, 100, 10, 0.8) == pytest.approx(0.8e-3)


def test_biases_and_bn_parameters_step_at_lr_biases(tmp_path):
    argv = ["--data", "synthetic", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0",
            "--print-freq", "1", "--knn-every", "-1", "--epochs", "2", "--max-steps", "1", "--projector", "16-16-16",
            "--warmup-epochs", "0", "--lr", "0.4", "--lr-biases", "0.01", "--output-dir", str(tmp_path)]
    barlow.main(argv)
    lr, lr_biases = 0.4 * 8 / 256, 0.01 * 8 / 256  # step 0 without warm-up: the peaks
    record = [r for r in read_log(tmp_path) if "loss" in r][0]
    assert record["lr"] == pytest.approx(lr) and record["lr_biases"] == pytest.approx(lr_biases)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    before, _ = barlow.build_encoders(barlow.parse_args(argv), torch.device("cpu"))
    names = {id(p): n for n, p in before.named_parameters()}
    groups = barlow.make_optimizer(before, barlow.parse_args(argv)).param_groups
    assert [g["biases"] for g in groups] == [False, True] and len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)
    assert all(p.ndim == 1 for p in groups[1]["params"]) and all(p.ndim > 1 for p in groups[0]["params"])
    saved = ckpt["optimizer"]
    assert [g["lr"] for g in saved["param_groups"]] == pytest.approx([lr, lr_biases])
    index = 0  # the optimizer's state numbers the parameters group after group
    for group in groups:
        for p in group["params"]:
            buf = saved["state"][index]["momentum_buffer"]  # the first step's update before the lr
            step = p.detach() - ckpt["source"][names[id(p)]]
            if group["biases"]:  # 1-D: no trust ratio, no weight decay, lr-biases
                assert torch.allclose(step, lr_biases * buf, rtol=1e-4, atol=3e-7), names[id(p)]  # float32 weights ~1
            index += 1


# ---- 2 processes ---------------------------------------------------------------------------------
def _plain(rank):
    """Each rank: its half of the global encodings -> its loss and its local gradient."""
    z_s, z_t = [x[4 * rank:4 * rank + 4].clone() for x in encodings(n=8, d=5, seed=3)]
    z_s.requires_grad_()
    loss = barlow.barlow_loss(z_s, z_t, LAMBD)
    loss.backward()
    return {"loss": loss.detach(), "grad": z_s.grad}


def _both(rank):
    return {"plain": _plain(rank), "steps": {sym: first_step(sym) for sym in (False, True)}}


@pytest.fixture(scope="module")
def two():
    """Both 2-process checks in one spawn (starting processes is most of their time)."""
    torch.set_num_threads(1)
    return spawn(_both)


def test_loss_of_half_batches_is_the_global_loss(two):
    two = [r["plain"] for r in two]
    z_s, z_t = encodings(n=8, d=5, seed=3)
    z_s.requires_grad_()
    loss = barlow.barlow_loss(z_s, z_t, LAMBD)
    loss.backward()
    for r in range(2):  # global BN statistics and c: every process has the global loss
        assert two[r]["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    # DDP averages the processes' gradients: (grad of rank 0 + grad of rank 1) / 2 == one process's
    assert torch.allclose(torch.cat([r["grad"] for r in two]) / 2, z_s.grad, atol=1e-5)


def first_step(sym):
    """Step 0 of the script's pieces with every BN global (see test_distributed) -> the loss and
    source gradients, averaged over the processes as DDP and the log would."""
    args = barlow.parse_args(["--arch", "resnet18", "--image-size", "32", "--projector", "16-16-16",
                              "--batch-size", "8", "--workers", "0", "--multicrop", "2", "--mean-enc", "2"]
                             + (["--sym"] if sym else []))
    source, target = barlow.build_encoders(args, torch.device("cpu"))
    source, target = barlow.augment.sync_bn(source, None), barlow.augment.sync_bn(target, None)
    train_set = barlow.augment.dataset("synthetic", "train", barlow.make_views(args), seed=args.seed)
    batch, _ = next(iter(barlow.train_loader(train_set, 0, 0, args)))
    loss, _, _ = barlow.train_step(source, target, batch, args)
    loss.backward()
    out = {"loss": loss.detach().clone()}
    for name in ("backbone.conv1.weight", "backbone.bn1.bias", "projector.0.weight", "projector.1.weight", "projector.6.weight"):
        out[name] = source.get_parameter(name).grad.clone()
    if barlow.world_size() > 1:
        for value in out.values():
            torch.distributed.all_reduce(value)
            value /= barlow.world_size()
    return out


def test_two_processes_with_half_batches_equal_one_with_the_whole(two):
    two = [r["steps"] for r in two]
    for sym in (False, True):
        one = first_step(sym)
        assert torch.allclose(two[0][sym]["loss"], one["loss"], rtol=1e-5), (sym, one["loss"], two[0][sym]["loss"])
        for name, grad in one.items():
            if name != "loss":
                error = (two[0][sym][name] - grad).abs().max()
                assert grad.abs().max() > 0 and error < 1e-3 * grad.abs().max(), (sym, name, error)


# ---- the published run: the original's gradient-free all-reduce on W GPUs ------------------------
def official_loss(z1, z2, lambd, batch_size):
    """A transcription of facebookresearch/barlowtwins main.py (BarlowTwins.forward after the projector):
    c = bn(z1).T @ bn(z2) / batch_size, then torch.distributed.all_reduce(c), which autograd does not
    see: every process's gradient flows through its own share of c only. (bn: SyncBN, affine=False.)"""
    bn = barlow.augment.GlobalBatchNorm(z1.shape[1], affine=False)
    c = bn(z1.float()).T @ bn(z2.float())
    c.div_(batch_size)
    torch.distributed.all_reduce(c)
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())  # the diagonal now holds (c_ii - 1)^2: excluded
    return on_diag + lambd * off_diag


PUBLISHED = ["--data", "synthetic", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0",
             "--print-freq", "1", "--knn-every", "-1", "--epochs", "1", "--max-steps", "3", "--projector", "16-16-16",
             "--warmup-epochs", "0", "--lr", "2.0", "--sym", "--global-bn"]


RUNS = (("original", "official", 1e-2, 0.2), ("equivalent", "ours", 2e-2, 0.1), ("unscaled", "ours", 1e-2, 0.2))


def _published(rank, ports, out):
    """Three LARS steps in 2 processes (torchrun's environment): the original loss at (wd, lr-biases),
    this script's loss at (2 wd, lr-biases / 2), and this script's at (wd, lr-biases)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    ours = barlow.barlow_loss
    try:
        for (name, loss, wd, lr_biases), port in zip(RUNS, ports):
            os.environ["MASTER_PORT"] = str(port)
            barlow.barlow_loss = (lambda z1, z2, lambd: official_loss(z1, z2, lambd, 8)) if loss == "official" else ours
            barlow.main(PUBLISHED + ["--wd", str(wd), "--lr-biases", str(lr_biases), "--output-dir", os.path.join(out, name)])
    finally:
        barlow.barlow_loss = ours  # the process serves other tests after this one


def test_published_hyper_parameters_under_the_original_all_reduce_equal_the_scaled_defaults(tmp_path):
    """On W = 2 processes the original's loss (gradient-free all-reduce: each parameter gets 1/W of the
    global-batch gradient) with (wd, lr-biases) trains the same weights as this script's loss with
    (W wd, lr-biases / W), under LARS; this script with the unscaled values trains other weights."""
    pool().run(_published, [free_port() for _ in RUNS], str(tmp_path))
    source = {name: torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)["source"]
              for name in ("original", "equivalent", "unscaled")}
    moved = {k: (source["original"][k] - initial).abs().max() for k, initial in
             barlow.build_encoders(barlow.parse_args(PUBLISHED), torch.device("cpu"))[0].state_dict().items()
             if k.endswith(("weight", "bias"))}
    for key, value in source["original"].items():
        if key.endswith(("weight", "bias")) and moved[key] > 0:
            torch.testing.assert_close(source["equivalent"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    differs = lambda k: (source["unscaled"][k] - source["original"][k]).abs().max() / moved[k]
    assert differs("backbone.bn1.bias") > 0.1 and differs("projector.0.weight") > 0.01
    # so the defaults are the published 16-GPU run's: wd 1e-6 x 16, lr-biases 0.0048 / 16
    defaults = barlow.parse_args([])
    assert defaults.wd == pytest.approx(1e-6 * 16) and defaults.lr_biases == pytest.approx(0.0048 / 16)
    assert defaults.lr == 0.2 and defaults.batch_size == 2048 and defaults.lambd == 0.0051
