"""mocov3_asym.py against hand computations: the 2T-scaled in-batch InfoNCE (asymmetric and --sym
steps, MultiCrop, MeanEnc), labels offset by rank (1 process == 2 processes), the MoCo v3 heads,
the defaults resolved per backbone, and the ViT pieces (sin-cos position embedding, frozen patch
projection, torchvision keys, small crops)."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import mocov3_asym as mocov3
from conftest import Scale
from test_distributed import spawn


def hand_contrastive(p, z, temperature):
    """Explicit loops: mean over i of -log softmax_j(cos(p_i, z_j) / T)[i], times 2T."""
    p, z = p.detach().double(), z.detach().double()
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    total = 0.0
    for i in range(len(p)):
        logits = [cos(p[i], z[j]) / temperature for j in range(len(z))]
        total += -(logits[i] - math.log(sum(math.exp(l) for l in logits)))
    return total / len(p) * 2 * temperature


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_contrastive_loss_by_hand(temperature):
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    z = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    loss = mocov3.contrastive_loss(p, z, temperature)
    assert loss.item() == pytest.approx(hand_contrastive(p, z, temperature), rel=1e-6)
    # orthonormal pairs: own logit 1/T, the other 0 -> 2T log(1 + exp(-1/T))
    eye = torch.eye(2) * 3
    assert mocov3.contrastive_loss(eye, eye, temperature).item() == pytest.approx(
        2 * temperature * math.log(1 + math.exp(-1 / temperature)), rel=1e-6)


def step_args(m=0, n_t=1, sym=False, temperature="0.5"):
    return mocov3.parse_args(["--multicrop", str(m), "--mean-enc", str(n_t), "--temperature", temperature]
                             + (["--sym"] if sym else []))


def test_asymmetric_step_with_multicrop_and_mean_enc_by_hand():
    torch.manual_seed(0)
    source, target = Scale(predictor=True), Scale(predictor=False)
    target.projector.weight.data = source.projector.weight.data.clone()
    n, m, n_t = 3, 2, 2
    batch = {"source": torch.randn(n, 1, 2, 2), "target": torch.randn(n_t * n, 1, 2, 2),
             "source_small": torch.randn(m * n, 1, 2, 2)}
    loss, p, z = mocov3.train_step(source, target, batch, step_args(m, n_t))
    P, W = source.predictor.weight, source.projector.weight
    enc = lambda x: W @ x.flatten()
    targets = torch.stack([(enc(batch["target"][i]) + enc(batch["target"][n + i])) / 2 for i in range(n)])  # MeanEnc
    expected = hand_contrastive(torch.stack([P @ enc(batch["source"][i]) for i in range(n)]), targets, 0.5)
    for j in range(m):  # each small crop against the same targets, averaged
        small = torch.stack([P @ enc(batch["source_small"][j * n + i]) for i in range(n)])
        expected += hand_contrastive(small, targets, 0.5) / m
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert p.shape == z.shape == (n, 3)


def test_sym_is_the_original_two_directions():
    torch.manual_seed(1)
    source, target = Scale(predictor=True), Scale(predictor=False)
    batch = {"source": torch.randn(4, 1, 2, 2), "target": torch.randn(4, 1, 2, 2)}
    asym, _, _ = mocov3.train_step(source, target, batch, step_args())
    sym, _, _ = mocov3.train_step(source, target, batch, step_args(sym=True))
    P, W = source.predictor.weight, source.projector.weight
    enc = lambda x: x.flatten(1) @ W.T
    q1, q2 = enc(batch["source"]) @ P.T, enc(batch["target"]) @ P.T
    k1, k2 = enc(batch["source"]), enc(batch["target"])
    assert asym.item() == pytest.approx(hand_contrastive(q1, k2, 0.5), rel=1e-5)
    assert sym.item() == pytest.approx(hand_contrastive(q1, k2, 0.5) + hand_contrastive(q2, k1, 0.5), rel=1e-5)


def test_resnet_heads_and_zero_init_residual():
    args = mocov3.parse_args(["--arch", "resnet18", "--dim", "8", "--mlp-dim", "16"])
    source, target = mocov3.build_encoders(args, torch.device("cpu"))
    kinds = lambda seq: [(type(l).__name__, getattr(l, "bias", None) is not None, getattr(l, "affine", None)) for l in seq]
    assert kinds(source.projector) == [("Linear", False, None), ("BatchNorm1d", True, True), ("ReLU", False, None),
                                       ("Linear", False, None), ("BatchNorm1d", False, False)]
    assert kinds(source.predictor) == [("Linear", False, None), ("BatchNorm1d", True, True), ("ReLU", False, None),
                                       ("Linear", False, None)]  # no last BN on the ResNet predictor
    assert (source.projector[0].in_features, source.projector[3].out_features) == (512, 8)
    assert isinstance(target.predictor, nn.Identity)
    assert all(block.bn2.weight.abs().sum() == 0 for layer in (source.backbone.layer1, source.backbone.layer4) for block in layer)


# ---- defaults per backbone and the checks -------------------------------------------------------
def test_defaults_resolved_per_arch():
    resolved = lambda argv: (lambda a: (a.optimizer, a.lr, a.wd, a.warmup_epochs, a.temperature))(mocov3.parse_args(argv))
    assert resolved([]) == ("lars", 0.6, 1e-6, 10, 1.0)  # resnet50
    assert resolved(["--arch", "vit_small"]) == ("adamw", 1.5e-4, 0.1, 40, 0.2)
    assert resolved(["--arch", "vit_base"]) == ("adamw", 1.5e-4, 0.1, 40, 0.2)
    assert resolved(["--arch", "vit_small", "--optimizer", "lars"]) == ("lars", 0.3, 1e-6, 40, 0.2)  # lr, wd follow the optimizer
    # MoCo v3's schedules: 100 epochs for ResNets, 300 for ViTs; LARS at 0.3 from 300 epochs on
    assert [mocov3.parse_args(a).epochs for a in ([], ["--arch", "vit_small"], ["--arch", "vit_base", "--epochs", "7"])] == [100, 300, 7]
    assert resolved(["--epochs", "300"])[1] == 0.3 and resolved(["--epochs", "299"])[1] == 0.6
    assert resolved(["--arch", "vit_small", "--lr", "0", "--wd", "0", "--warmup-epochs", "0", "--temperature", "0.1"]) == (
        "adamw", 0.0, 0.0, 0, 0.1)  # explicit values, zeros included, are kept
    args = mocov3.parse_args([])
    assert args.epochs == 100 and args.batch_size == 4096 and args.ema == 0.99 and (args.dim, args.mlp_dim) == (256, 4096)
    assert isinstance(mocov3.make_optimizer(nn.Linear(2, 2), mocov3.parse_args([])), mocov3.LARS)
    adamw = mocov3.make_optimizer(nn.Linear(2, 2), mocov3.parse_args(["--arch", "vit_small"]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.1
    # MoCo v3's crops: min scale 0.2 for ResNets, 0.08 for ViTs; WeakerAug keeps 0.08, MultiCrop 0.14
    crop_scale = lambda argv, view="source": mocov3.make_views(mocov3.parse_args(argv)).transforms[view].transforms[0].scale
    assert crop_scale([]) == crop_scale([], "target") == (0.2, 1.0)
    assert crop_scale(["--arch", "vit_small"]) == crop_scale(["--crop-min", "0.08"]) == (0.08, 1.0)
    assert crop_scale(["--asym-aug"], "target") == (0.08, 1.0) and crop_scale(["--multicrop"]) == (0.14, 1.0)


def test_check_args_takes_vits_and_rejects_partial_patches():
    check = lambda argv: mocov3.check_args(mocov3.parse_args(argv + ["--batch-size", "16"]), range(5000))
    check(["--arch", "vit_small", "--image-size", "32"])
    check(["--arch", "vit_base", "--image-size", "224", "--multicrop", "6"])  # small crops 96 = 6 patches
    check(["--arch", "resnet18", "--image-size", "40"])
    with pytest.raises(mocov3.augment.InputError, match="--image-size 40 must be a multiple of --patch-size 16"):
        check(["--arch", "vit_small", "--image-size", "40"])
    with pytest.raises(mocov3.augment.InputError, match=r"--image-size 64 and its MultiCrop crops \(24 px\) must be multiples of --patch-size 16"):
        check(["--arch", "vit_small", "--image-size", "64", "--multicrop", "2"])
    with pytest.raises(mocov3.augment.InputError, match="not a torchvision ResNet"):
        check(["--arch", "vit_huge"])


# ---- 1 process with the global batch == 2 processes with half each ---------------------------
def halves_loss():
    """contrastive_loss on this process's rows of a fixed global batch, averaged over processes."""
    g = torch.Generator().manual_seed(3)
    p, z = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    n = len(p) // mocov3.world_size()
    rows = slice(mocov3.rank() * n, (mocov3.rank() + 1) * n)
    return mean_over_processes(mocov3.contrastive_loss(p[rows], z[rows], 0.2)), hand_contrastive(p, z, 0.2)


def mean_over_processes(x):
    x = x.detach().clone()
    if mocov3.world_size() > 1:  # DDP would average the gradients and the logged losses
        torch.distributed.all_reduce(x)
        x /= mocov3.world_size()
    return x


def first_loss():
    args = mocov3.parse_args(["--arch", "resnet18", "--image-size", "32", "--dim", "16", "--mlp-dim", "32",
                              "--batch-size", "8", "--workers", "0", "--multicrop", "2", "--mean-enc", "2", "--sym"])
    source, target = mocov3.build_encoders(args, torch.device("cpu"))
    source, target = mocov3.augment.sync_bn(source, None), mocov3.augment.sync_bn(target, None)  # all BN global (see test_distributed)
    train_set = mocov3.augment.dataset("synthetic", "train", mocov3.make_views(args), seed=args.seed)
    batch, _ = next(iter(mocov3.train_loader(train_set, 0, 0, args)))
    loss, _, _ = mocov3.train_step(source, target, batch, args)
    loss.backward()
    halves, by_hand = halves_loss()
    return {"loss": mean_over_processes(loss), "grad": mean_over_processes(source.projector[0].weight.grad),
            "halves": halves, "by_hand": torch.tensor(by_hand)}


def _first_loss(rank):
    return first_loss()


def test_two_processes_with_half_batches_equal_one_with_the_whole():
    torch.set_num_threads(1)
    one = first_loss()
    two = spawn(_first_loss)
    assert two[0]["halves"].item() == pytest.approx(two[0]["by_hand"].item(), rel=1e-5)  # labels offset by rank
    assert one["halves"].item() == pytest.approx(one["by_hand"].item(), rel=1e-5)
    assert torch.allclose(two[0]["loss"], one["loss"], rtol=1e-5), (one["loss"], two[0]["loss"])
    assert (two[0]["grad"] - one["grad"]).abs().max() < 1e-3 * one["grad"].abs().max(), (two[0]["grad"] - one["grad"]).abs().max()


# ---- ViT ---------------------------------------------------------------------------------------
def test_sincos_position_embedding_by_hand():
    dim = 8  # D/4 = 2 frequencies: 10000^0 = 1 and 10000^(-1/2) = 0.01
    pe = mocov3.sincos_position_embedding(2, 2, dim)
    assert pe.shape == (1, 5, dim) and torch.equal(pe[0, 0], torch.zeros(dim))  # class token: zeros
    for r in range(2):
        for c in range(2):
            expected = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
                        math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
            assert pe[0, 1 + 2 * r + c].tolist() == pytest.approx(expected, abs=1e-6), (r, c)
    # MoCo v3's own construction (meshgrid of w then h), on a square grid as its ViTs have
    grid_w, grid_h = torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(4.0) / 4)
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    original = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    assert torch.allclose(mocov3.sincos_position_embedding(3, 3, 16)[0, 1:], original)


@pytest.fixture(scope="module")
def vit():
    args = mocov3.parse_args(["--arch", "vit_small", "--image-size", "32", "--dim", "16", "--mlp-dim", "32"])
    source, target = mocov3.build_encoders(args, torch.device("cpu"))
    return args, source, target


def test_vit_backbone_is_mocov3s_on_torchvision_keys(vit):
    _, _, target = vit  # never updated here: the initialisation
    net = target.backbone
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert net(x).shape == (3, 384)
    assert torch.equal(net.encoder.pos_embedding, mocov3.sincos_position_embedding(2, 2, 384))
    assert net.class_token.abs().max() < 1e-4 and net.class_token.abs().max() > 0  # normal, std 1e-6
    bound = math.sqrt(6 / (3 * 16 * 16 + 384))
    assert net.conv_proj.weight.abs().max() <= bound and net.conv_proj.weight.abs().max() > 0.9 * bound
    attention = net.encoder.layers[0].self_attention
    assert attention.in_proj_weight.abs().max() <= math.sqrt(6 / 768) and attention.in_proj_bias.abs().sum() == 0
    assert net.encoder.layers[0].mlp[0].bias.abs().sum() == 0
    # the state dict is torchvision's ViT's (minus the head), and gives the same class-token feature
    plain = torchvision.models.VisionTransformer(32, 16, num_layers=12, num_heads=12, hidden_dim=384, mlp_dim=1536)
    result = plain.load_state_dict(net.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["heads.head.bias", "heads.head.weight"] and not result.unexpected_keys
    plain.heads = nn.Identity()
    assert torch.allclose(plain(x), net(x), atol=1e-5)
    # a MultiCrop crop of 16 px (one patch): torchvision's ViT at 16 px with the embedding for that grid
    small = torchvision.models.VisionTransformer(16, 16, num_layers=12, num_heads=12, hidden_dim=384, mlp_dim=1536)
    small.heads = nn.Identity()
    weights = dict(net.state_dict(), **{"encoder.pos_embedding": mocov3.sincos_position_embedding(1, 1, 384)})
    small.load_state_dict(weights)
    assert torch.allclose(small(x[:, :, :16, :16]), net(x[:, :, :16, :16]), atol=1e-5)


def test_vit_heads_and_frozen_patch_projection_and_position_embedding(vit):
    args, source, target = vit
    assert [type(l).__name__ for l in source.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert [type(l).__name__ for l in source.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not source.projector[-1].affine and not source.predictor[-1].affine
    assert source.projector[0].in_features == 384 and args.temperature == 0.2
    frozen = [source.backbone.conv_proj.weight, source.backbone.conv_proj.bias, source.backbone.encoder.pos_embedding]
    before = [w.clone() for w in frozen] + [source.backbone.class_token.clone()]
    optimizer = mocov3.make_optimizer(source, args)
    in_optimizer = {id(w) for group in optimizer.param_groups for w in group["params"]}
    assert not any(id(w) in in_optimizer for w in frozen) and len(in_optimizer) == len(list(source.parameters())) - 3
    g = torch.Generator().manual_seed(5)
    batch = {"source": torch.randn(4, 3, 32, 32, generator=g), "target": torch.randn(4, 3, 32, 32, generator=g)}
    loss, _, _ = mocov3.train_step(source, target, batch, args)
    loss.backward()
    assert all(w.grad is None and not w.requires_grad for w in frozen)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    optimizer.step()
    assert all(torch.equal(w, b) for w, b in zip(frozen, before))
    assert not torch.equal(source.backbone.class_token, before[-1])  # the rest trains


def test_gathered_targets_are_detached_on_one_process_as_on_several():
    """concat_all_gather is the no-gradient gather at every world size: the loss never reaches z."""
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    assert not mocov3.concat_all_gather(z).requires_grad
    mocov3.contrastive_loss(p, z, 0.2).backward()
    assert z.grad is None and p.grad.abs().sum() > 0
