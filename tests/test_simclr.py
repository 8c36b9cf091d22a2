"""simclr_asym.py against hand computations: NT-Xent asymmetric and --sym (explicit loops), the
steps with MultiCrop and MeanEnc, the stop-gradient on the target, the projector, the labels
offset by rank, and 1 process == 2 processes in loss and gradient."""
import pytest
import torch
import torch.nn as nn

import simclr_asym as simclr
from test_distributed import spawn

T = 0.1


# ---- NT-Xent by hand: one loss per anchor, explicit loops ------------------------------------
def unit(rows):
    return [v / v.norm() for v in rows]


def by_hand(q, k, t=T):
    """Asymmetric: anchor q_i; candidates every k_j and every q_j but q_i; positive k_i."""
    q, k = unit(q), unit(k)
    losses = []
    for i in range(len(q)):
        candidates = [k[j] for j in range(len(k))] + [q[j] for j in range(len(q)) if j != i]
        denominator = sum(torch.exp(q[i] @ c / t) for c in candidates)
        losses.append(-torch.log(torch.exp(q[i] @ k[i] / t) / denominator))
    return losses


def by_hand_sym(z1, z2, t=T):
    """Original: 2N anchors (view 1 of every image, then view 2); candidates all 2N but the
    anchor; positive the other view of its image."""
    z, n = unit(list(z1) + list(z2)), len(z1)
    losses = []
    for a in range(2 * n):
        other = (a + n) % (2 * n)
        denominator = sum(torch.exp(z[a] @ z[c] / t) for c in range(2 * n) if c != a)
        losses.append(-torch.log(torch.exp(z[a] @ z[other] / t) / denominator))
    return losses


def mean(losses):
    return sum(losses) / len(losses)


def official_loss(z1, z2, t=T, large_num=1e9):
    """A transcription of the original SimCLR loss (add_contrastive_loss of google-research/simclr,
    one replica): l2-normalised halves; logits_aa / logits_bb with the anchor itself masked by a
    large number; loss_a + loss_b, each the mean cross-entropy over the N images."""
    h1, h2 = nn.functional.normalize(z1, dim=1), nn.functional.normalize(z2, dim=1)
    n = len(h1)
    labels = torch.arange(n)
    masks = torch.eye(n)
    logits_aa = h1 @ h1.T / t - masks * large_num
    logits_bb = h2 @ h2.T / t - masks * large_num
    logits_ab, logits_ba = h1 @ h2.T / t, h2 @ h1.T / t
    loss_a = nn.functional.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = nn.functional.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


def encodings(n=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_nt_xent_by_hand():
    q, k = encodings()
    for t in (T, 0.5):
        assert simclr.nt_xent(q, k, t).item() == pytest.approx(mean(by_hand(q, k, t)).item(), rel=1e-5)
        assert simclr.nt_xent(3 * q, k / 2, t).item() == pytest.approx(mean(by_hand(q, k, t)).item(), rel=1e-5)
    # 4 images: 1 positive and 2*4 - 2 = 6 negatives per anchor; all equal -> log 7
    same = torch.ones(4, 5)
    assert simclr.nt_xent(same, same, 1.0).item() == pytest.approx(torch.log(torch.tensor(7.0)).item(), rel=1e-6)


def test_nt_xent_target_gets_no_gradient_source_gets_both_roles():
    q, k = encodings()
    q.requires_grad_(), k.requires_grad_()
    simclr.nt_xent(q, k, T).backward()
    q_hand = q.detach().clone().requires_grad_()
    mean(by_hand(q_hand, k.detach())).backward()  # q as anchor and as negative of the others
    assert k.grad is None or not k.grad.any()
    assert torch.allclose(q.grad, q_hand.grad, atol=1e-6)


def test_nt_xent_sym_is_the_original_loss_at_its_scale():
    z1, z2 = encodings(seed=1)
    z1.requires_grad_(), z2.requires_grad_()
    loss = simclr.nt_xent_sym(z1, z2, T)
    h1, h2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    expected = official_loss(h1, h2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(2 * mean(by_hand_sym(z1.detach(), z2.detach())).item(), rel=1e-5)
    loss.backward(), expected.backward()
    assert torch.allclose(z1.grad, h1.grad, atol=1e-6) and torch.allclose(z2.grad, h2.grad, atol=1e-6)
    assert z2.grad.abs().sum() > 0  # gradients through both views


# ---- the steps: a linear stand-in encoder ----------------------------------------------------
class Linear(nn.Module):
    """Flattens each view and multiplies by a fixed matrix: encodings easy to compute by hand."""

    def __init__(self):
        super().__init__()
        self.projector = nn.Linear(4, 3, bias=False)
        torch.nn.init.normal_(self.projector.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, views):
        return [self.projector(x.flatten(1)) for x in views]


def pair():
    source, target = Linear(), Linear()
    target.requires_grad_(False)
    return source, target


def step_args(m=0, n_t=1, sym=False):
    return simclr.parse_args(["--multicrop", str(m), "--mean-enc", str(n_t)] + (["--sym"] if sym else []))


def test_asymmetric_step_with_multicrop_and_mean_enc_by_hand():
    torch.manual_seed(0)
    source, target = pair()
    n, m, n_t = 3, 2, 2
    batch = {"source": torch.randn(n, 1, 2, 2), "target": torch.randn(n_t * n, 1, 2, 2),
             "source_small": torch.randn(m * n, 1, 2, 2)}
    loss, q, k = simclr.train_step(source, target, batch, step_args(m, n_t))
    W = source.projector.weight
    enc = lambda x, w=W: [w @ x[i].flatten() for i in range(len(x))]
    t = enc(batch["target"], W.detach())
    k_hand = [(t[i] + t[n + i]) / 2 for i in range(n)]  # MeanEnc: mean before normalising
    small = enc(batch["source_small"])
    expected = mean(by_hand(enc(batch["source"]), k_hand))
    expected = expected + mean([mean(by_hand(small[j * n:(j + 1) * n], k_hand)) for j in range(m)])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert q.shape == k.shape == (n, 3)
    loss.backward()
    grad = W.grad.clone()
    W.grad = None
    expected.backward()  # the target's encodings are constants: stop-gradient
    assert torch.allclose(grad, W.grad, atol=1e-5)


def test_sym_step_is_the_original_simclr_on_the_source():
    torch.manual_seed(1)
    source, target = pair()
    target.projector.weight.data.zero_()  # unused for the loss under --sym
    batch = {"source": torch.randn(3, 1, 2, 2), "target": torch.randn(3, 1, 2, 2)}
    loss, _, _ = simclr.train_step(source, target, batch, step_args(sym=True))
    W = source.projector.weight
    expected = official_loss(torch.stack([W @ x.flatten() for x in batch["source"]]),
                             torch.stack([W @ x.flatten() for x in batch["target"]]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    grad = W.grad.clone()
    W.grad = None
    expected.backward()  # gradients through both views
    assert torch.allclose(grad, W.grad, atol=1e-5)


class CenterBatch(nn.Module):
    """A stand-in encoder whose outputs depend on the batch it sees (as BN's do): x minus the batch mean."""

    def __init__(self):
        super().__init__()
        self.projector = nn.Linear(4, 3, bias=False)
        self.batches = []

    def forward(self, views):
        self.batches += [len(x) for x in views]
        return [self.projector(x.flatten(1) - x.flatten(1).mean(0)) for x in views]


def test_sym_views_share_one_batch_as_the_original():
    """The original SimCLR encodes the 2N views of a batch in one forward (one BN batch)."""
    torch.manual_seed(2)
    source, target = CenterBatch(), CenterBatch()
    batch = {"source": torch.randn(3, 1, 2, 2), "target": torch.randn(3, 1, 2, 2)}
    loss, _, _ = simclr.train_step(source, target, batch, step_args(sym=True))
    assert source.batches == [6] and target.batches == []
    both = torch.cat([batch["source"], batch["target"]]).flatten(1)
    z = source.projector(both - both.mean(0))
    assert loss.item() == pytest.approx(official_loss(z[:3], z[3:]).item(), rel=1e-5)


# ---- the encoders ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--global-bn", "--bn-splits", "2"], ["--asym-bn", "--bn-splits", "2"]])
def test_projector_three_layers_last_bn_scales_without_shift(flags):
    args = simclr.parse_args(["--arch", "resnet18", "--dim", "8"] + flags)
    source, target = simclr.build_encoders(args, torch.device("cpu"))
    linears = [layer for layer in source.projector if isinstance(layer, nn.Linear)]
    assert [(l.in_features, l.out_features, l.bias) for l in linears] == [(512, 512, None), (512, 512, None), (512, 8, None)]
    assert [name for name, _ in source.projector.named_parameters()] == [
        "0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias", "6.weight", "8.weight"]  # 8: the scale
    for encoder in (source, target):
        assert not encoder.projector[7].affine and len(encoder.projector) == 9
    assert all(torch.equal(p, source.get_parameter(n)) for n, p in target.named_parameters())
    assert not any(p.requires_grad for p in target.parameters())
    assert not source.backbone.layer1[0].bn2.weight.any()  # zero_init_residual, as SimCLR's ResNet
    h = torch.randn(6, 512)
    with torch.no_grad():
        source.projector[8].weight.fill_(2.0)
        z = source.projector(h)
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5)  # no shift
    assert torch.allclose(z.var(0, unbiased=False), torch.full((8,), 4.0), rtol=1e-3)  # scale 2


# ---- 2 processes ---------------------------------------------------------------------------------
def global_encodings():
    q, k = encodings(n=8, d=6, seed=3)
    z1, z2 = encodings(n=8, d=6, seed=4)
    return q, k, z1, z2


def plain(rank):
    """Each rank: its half of the global encodings -> its loss and its local gradients."""
    rows = slice(4 * rank, 4 * rank + 4)
    q, k, z1, z2 = [x[rows].clone().requires_grad_() for x in global_encodings()]
    loss = simclr.nt_xent(q, k, T)
    loss.backward()
    loss_sym = simclr.nt_xent_sym(z1, z2, T)
    loss_sym.backward()
    return {"loss": loss.detach(), "q_grad": q.grad, "loss_sym": loss_sym.detach(), "z1_grad": z1.grad, "z2_grad": z2.grad}


def _two_processes(rank):
    return {"plain": plain(rank), "steps": {sym: first_step(sym) for sym in (False, True)}}


@pytest.fixture(scope="module")
def two():
    """Everything the 2-process tests need, from one start of 2 gloo processes (start-up dominates)."""
    torch.set_num_threads(1)
    return spawn(_two_processes)


def test_labels_offset_by_rank_and_gradients_pass_the_gather(two):
    two = [r["plain"] for r in two]
    q, k, z1, z2 = [x.requires_grad_() for x in global_encodings()]
    per_anchor, per_anchor_sym = by_hand(q, k), by_hand_sym(z1, z2)
    for r in range(2):  # rank r's anchors are the global images 4r..4r+3 (both views under --sym)
        assert two[r]["loss"].item() == pytest.approx(mean(per_anchor[4 * r:4 * r + 4]).item(), rel=1e-5)
        mine = per_anchor_sym[4 * r:4 * r + 4] + per_anchor_sym[8 + 4 * r:8 + 4 * r + 4]
        assert two[r]["loss_sym"].item() == pytest.approx(2 * mean(mine).item(), rel=1e-5)
    # DDP averages the processes' gradients: (grad of rank 0 + grad of rank 1) / 2 == one process's
    mean(per_anchor).backward()
    (2 * mean(per_anchor_sym)).backward()
    assert torch.allclose(torch.cat([r["q_grad"] for r in two]) / 2, q.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["z1_grad"] for r in two]) / 2, z1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["z2_grad"] for r in two]) / 2, z2.grad, atol=1e-6)


def first_step(sym):
    """Step 0 of the script's pieces with every BN global (see test_distributed) -> the loss and
    source gradients, averaged over the processes as DDP and the log would."""
    args = simclr.parse_args(["--arch", "resnet18", "--image-size", "32", "--dim", "16", "--mlp-dim", "32",
                              "--batch-size", "8", "--workers", "0", "--multicrop", "2", "--mean-enc", "2"]
                             + (["--sym"] if sym else []))
    source, target = simclr.build_encoders(args, torch.device("cpu"))
    source, target = simclr.augment.sync_bn(source, None), simclr.augment.sync_bn(target, None)
    train_set = simclr.augment.dataset("synthetic", "train", simclr.make_views(args), seed=args.seed)
    batch, _ = next(iter(simclr.train_loader(train_set, 0, 0, args)))
    loss, _, _ = simclr.train_step(source, target, batch, args)
    loss.backward()
    out = {"loss": loss.detach().clone()}
    for name in ("backbone.conv1.weight", "projector.0.weight", "projector.6.weight", "projector.8.weight"):
        out[name] = source.get_parameter(name).grad.clone()
    if simclr.world_size() > 1:
        for value in out.values():
            torch.distributed.all_reduce(value)
            value /= simclr.world_size()
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
