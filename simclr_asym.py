"""SimCLR in asymmetric form, with every design of "On the Importance of Asymmetry for Siamese
Representation Learning" (Wang, Fan, Tian, Kihara, Chen, CVPR 2022).

Method in five lines:
    source views x_s, target views x_t of each image            (augment.Views, SimCLR recipe)
    q = normalize(source(x_s))    gradient-updated: ResNet + 3-layer MLP projector, 128-d
    k = normalize(target(x_t))    no gradient: a clone of the source (its weights at every step)
    loss = NT-Xent(q; k+, the other k and q of all devices)   one pair, once (--sym: the original)
    target <- source

Designs (the paper keeps the target's encoding variance below the source's):
    source: --multicrop [M], --scalemix, --asym-aug (StrongerAug)    raise variance
    target: --asym-aug (WeakerAug), --asym-bn (SyncBN), --mean-enc N   lower variance
    --multicrop-on / --scalemix-on / --syncbn-on source|target|both, --source-aug / --target-aug,
    --mean-enc-source N place each design anywhere, as in the paper's case studies.

Examples:
    python simclr_asym.py --data synthetic --arch resnet18 --image-size 32 --epochs 6 \\
        --batch-size 128 --lr 1.0 --warmup-epochs 1 --temperature 0.2 --bn-splits 4 \\
        --workers 2   # CPU minutes
    torchrun --nproc_per_node=8 simclr_asym.py --data /path/to/imagenet \\
        --multicrop --asym-bn --mean-enc 2
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.distributed.elastic.multiprocessing.errors import record

import augment

FRAMEWORK = "simclr"

# =============================================================================================
# Arguments
# =============================================================================================
RESNETS = [name for name in torchvision.models.list_models(module=torchvision.models)
           if name.startswith(("resnet", "resnext", "wide_resnet"))]
PLACES, AUGS = ["source", "target", "both"], ["weaker", "default", "stronger"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=augment.HelpFormatter,
                                epilog=__doc__[__doc__.index("Examples:"):])
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="synthetic (built in) | cifar10 | cifar100 "
                   "| stl10 | an ImageFolder root with train/ and val/ or test/")
    g.add_argument("--data-root", default="data", help="where cifar10/cifar100/stl10 are (put)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out instead of stopping with their names")
    g.add_argument("--no-image-check", action="store_true",
                   help="do not look at every image file before training")
    g.add_argument("--image-size", type=int, default=224, help="standard crop size (CIFAR: 32)")
    g.add_argument("--workers", type=int, default=-1,
                   help="data workers per process (-1: the node's CPUs over its processes, <= 16)")
    g.add_argument("--gpu-aug", action="store_true",
                   help="colour operations on the device, batched; workers only crop and flip")
    g.add_argument("--data-on-device", action="store_true",
                   help="training images kept on the device, every view made there (CIFAR)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", help="a torchvision ResNet: " + ", ".join(RESNETS))
    g.add_argument("--cifar-stem", action="store_true",
                   help="3x3 stride-1 first convolution, no max-pool (32 px images)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=int, default=4096, help="global batch over all processes")
    g.add_argument("--lr", type=float, default=0.3, help="base lr: lr = base x batch / 256")
    g.add_argument("--wd", type=float, default=1e-6, help="weight decay (LARS; none on biases, BN)")
    g.add_argument("--warmup-epochs", type=float, default=10,
                   help="linear warm-up epochs, then cosine decay per step")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision (auto: bf16, or fp16 without bf16, on CUDA; off on CPU)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the forwards of source and target (inductor if bare)")
    g = p.add_argument_group("SimCLR")
    g.add_argument("--dim", type=int, default=128, help="encoding dimension (projector output)")
    g.add_argument("--mlp-dim", type=int, default=0,
                   help="projector hidden width (0: the backbone's feature dimension)")
    g.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature T")
    g.add_argument("--sym", action="store_true", help="the original SimCLR loss: both views "
                   "through the source in one batch, each an anchor, per image summed")
    g.add_argument("--global-bn", action="store_true",
                   help="SyncBN in every BN of source and target, as the original SimCLR")
    g.add_argument("--bn-splits", type=int, default=1,
                   help="each per-process BN normalises its batch in N groups: N devices on one")
    g = p.add_argument_group("asymmetric designs (the paper's preferred placement by default)")
    g.add_argument("--multicrop", type=int, nargs="?", const=6, default=0, metavar="M",
                   help="MultiCrop: M small crops (6 if bare; 96 px at 224) raise the source's "
                   "variance")
    g.add_argument("--multicrop-on", choices=PLACES, help="place MultiCrop (default: source)")
    g.add_argument("--multicrop-per-crop", action="store_true",
                   help="a forward (a BN batch) per small crop, as the official code")
    g.add_argument("--scalemix", action="store_true",
                   help="ScaleMix: two views mixed by a random box raise the source's variance")
    g.add_argument("--scalemix-on", choices=PLACES, help="place ScaleMix (implies --scalemix)")
    g.add_argument("--asym-aug", action="store_true", help="AsymAug: StrongerAug (+RandAugment) "
                   "on the source, WeakerAug (crop and flip) on the target")
    g.add_argument("--source-aug", choices=AUGS, help="the source's views (overrides --asym-aug)")
    g.add_argument("--target-aug", choices=AUGS, help="the target's views (overrides --asym-aug)")
    g.add_argument("--asym-bn", action="store_true",
                   help="AsymBN: SyncBN in the target projector lowers the target's variance")
    g.add_argument("--syncbn-on", choices=PLACES, help="place SyncBN (implies --asym-bn)")
    g.add_argument("--syncbn-group-size", type=int, default=0,
                   help="processes per SyncBN group (0: all; the official code: 8)")
    g.add_argument("--mean-enc", type=int, default=1, metavar="N", help="MeanEnc: the mean of N "
                   "views' encodings lowers the target's variance (paper: 2)")
    g.add_argument("--mean-enc-source", type=int, default=1, metavar="N",
                   help="MeanEnc on the source: N source views averaged")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=f"runs/{FRAMEWORK}_asym",
                   help="checkpoint.pth, backbone.pth and log.jsonl")
    g.add_argument("--resume", metavar="PATH", help="start from this checkpoint.pth (the output "
                   "directory's own, once there, wins: a requeued command continues its run)")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume although this command changes flags of the checkpoint's run")
    g.add_argument("--save-every", type=int, default=0,
                   help="also save every N steps (0: at epoch ends, stops and the end only)")
    g.add_argument("--dist-timeout", type=float, default=10,
                   help="minutes a process waits for the others before the job fails")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights and every view")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop after N steps in all, the schedule unchanged (0: all epochs)")
    g.add_argument("--print-freq", type=int, default=10,
                   help="log the loss every N steps; a stop signal takes effect there")
    g.add_argument("--knn-every", type=int, default=10,
                   help="kNN top-1 every N epochs and at the end (0: the end only; -1: never)")
    g.add_argument("--knn-k", type=int, default=200, help="kNN neighbours")
    g.add_argument("--knn-t", type=float, default=0.1, help="kNN temperature (ImageNet: 0.07)")
    g.add_argument("--variance-every", type=int, help="the variance monitor (the paper's "
                   "v_source, v_target) every N epochs and at the end (default: --knn-every)")
    g.add_argument("--variance-images", type=int, default=256,
                   help="variance monitor: the first N held-out images, in whole BN batches")
    g.add_argument("--variance-views", type=int, default=8, metavar="R",
                   help="variance monitor: R draws of each image's views per side (Fig. 2: 32)")
    args = p.parse_args(argv)
    if args.workers < 0:  # the CPUs this process may use, shared with the others on its node
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.workers = min(16, max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if args.amp == "auto":
        args.amp = "off" if not torch.cuda.is_available() else \
            "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if args.variance_every is None:
        args.variance_every = args.knn_every
    # the designs' placements as plain values (the checkpoint stores them)
    if args.multicrop_on and not args.multicrop:
        args.multicrop = 6
    args.multicrop_on = args.multicrop_on or "source"
    args.scalemix_on = args.scalemix_on or ("source" if args.scalemix else None)
    args.source_aug = args.source_aug or ("stronger" if args.asym_aug else "default")
    args.target_aug = args.target_aug or ("weaker" if args.asym_aug else "default")
    args.syncbn_on = args.syncbn_on or ("target" if args.asym_bn else None)
    return args


# =============================================================================================
# Model (and the collectives it needs; each is the identity on one process)
# =============================================================================================
world_size, rank = augment.world_size, augment.rank


def all_gather_with_grad(x):
    """Local NxC -> (world*N)xC in rank order; the gradient of every process's loss reaches the
    process that encoded each row (summed), so the global batch is one loss, as on one device."""
    return augment.all_gather_with_grad(x)


def resnet_backbone(arch, cifar_stem, zero_init_residual=False):
    """torchvision ResNet without its fc (-> pooled features) and its feature dimension.
    zero_init_residual: each block starts as the identity (last BN scale 0), as some do."""
    net = torchvision.models.get_model(arch, zero_init_residual=zero_init_residual)
    if cifar_stem:  # 32 px images: keep the resolution the ImageNet stem would divide by 4
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


class Scale(nn.Module):
    """Learnable per-channel scale, no shift: with BN(affine=False) before it, a BN with a scale
    but no shift (SimCLR's last projector BN), and every BN replacement below keeps it so."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.weight


def mlp(in_dim, hidden_dim, out_dim):
    """SimCLR's projector: 3 Linear (no bias: a BN follows each), BN, ReLU after the first two;
    the last BN scales but does not shift."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, hidden_dim, bias=False),
                         nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False),
                         nn.BatchNorm1d(out_dim, affine=False), Scale(out_dim))


class Encoder(nn.Module):
    """Backbone + projector, the same on source and target (SimCLR has no predictor)."""

    def __init__(self, args):
        super().__init__()
        self.backbone, f = resnet_backbone(args.arch, args.cifar_stem, zero_init_residual=True)
        self.projector = mlp(f, args.mlp_dim or f, args.dim)

    def forward(self, views):
        """List of N_ix3xHxW batches -> list of N_ixD outputs, in one call (one DDP forward)."""
        return [self.projector(self.backbone(x)) for x in views]


def build_encoders(args, device):
    """Source (gradient) and target (its clone, no gradient) with the BN of each placement."""
    torch.manual_seed(args.seed)
    source, target = Encoder(args).to(device), Encoder(args).to(device)
    target.load_state_dict(source.state_dict())
    group = augment.syncbn_group(args.syncbn_group_size)
    # +-------------------------------------------------------------------------------------+
    # | AsymBN: SyncBN in the target projector normalises by the statistics of the whole    |
    # | global batch instead of one device's, so the target encodings vary less with the     |
    # | batch they land in: lower target variance. (The source keeps per-device BN.)         |
    # +-------------------------------------------------------------------------------------+
    for name, encoder in (("source", source), ("target", target)):
        if args.syncbn_on in (name, "both"):
            encoder.projector = augment.sync_bn(encoder.projector, group)
        if args.global_bn:  # the original SimCLR: every BN over the global batch
            augment.sync_bn(encoder)
        if args.bn_splits > 1:  # every remaining per-device BN sees 1/splits of the batch
            augment.split_bn(encoder, args.bn_splits)
    target.requires_grad_(False)
    if args.channels_last:
        source = source.to(memory_format=torch.channels_last)
        target = target.to(memory_format=torch.channels_last)
    return source, target


@torch.no_grad()
def momentum_update(target, source, m):
    """target <- m * target + (1 - m) * source, over the target's parameters (BN statistics stay
    the target's own; a source predictor has no counterpart)."""
    names = [name for name, _ in target.named_parameters()]
    torch._foreach_lerp_([target.get_parameter(n) for n in names],
                         [source.get_parameter(n) for n in names], 1.0 - m)


@torch.no_grad()
def target_encode(target, x):
    """(n*N)x3xHxW -> (n*N)xD target encodings, no gradient (BN with this batch's statistics)."""
    return target([x])[0]


@torch.no_grad()
def side_encode(source, target, x, side, args):
    """(n*N)x3xHxW views of one side -> (n*N)xD encodings as the variance monitor measures them:
    the projector's output (a predictor left out, as the paper measures); the target's as
    training encodes them."""
    if side == "source":
        return source.projector(source.backbone(x))
    return target_encode(target, x)


# =============================================================================================
# Loss
# =============================================================================================
def nt_xent(q, k, temperature):
    """Asymmetric NT-Xent. q: NxD source encodings, k: NxD target encodings (stop-gradient) of
    this process's N images, l2-normalised here; B = world * N. Anchor q_g (g = rank * N + i)
    against the B target encodings k (gathered, no gradient) and the B source encodings q
    (gathered with gradient) but itself: the positive k_g and 2B - 2 negatives, as SimCLR. -> mean
    over the N anchors of -log softmax(q_g . c / T)[k_g] (DDP's mean: the global batch's)."""
    with torch.autocast(q.device.type, enabled=False):  # logits / T in float32
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        index = torch.arange(len(q), device=q.device) + rank() * len(q)  # global indices g
        to_k = q @ augment.gather(k).T  # NxB (gathered, no gradient), positive at column g
        to_q = (q @ all_gather_with_grad(q).T).scatter(1, index[:, None], float("-inf"))  # NxB
        return F.cross_entropy(torch.cat([to_k, to_q], dim=1) / temperature, index)


def nt_xent_sym(z1, z2, temperature):
    """The original SimCLR loss. z1, z2: NxD source encodings (with gradient) of the two views of
    this process's N images, l2-normalised here; B = world * N. Candidates: [view 1 of all B images;
    view 2 of all B] (gathered with gradient); anchors: this process's 2N rows (g, B + g), each
    against all but itself, the other view the positive. -> the original's scale: per image its two
    anchors' losses summed, mean over the images (2x the mean over the 2N anchors)."""
    with torch.autocast(z1.device.type, enabled=False):  # logits / T in float32
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        b = len(z1) * world_size()
        index = torch.arange(len(z1), device=z1.device) + rank() * len(z1)  # global indices g
        candidates = torch.cat(all_gather_with_grad(torch.cat([z1, z2], dim=1)).chunk(2, dim=1))
        itself, positive = torch.cat([index, b + index]), torch.cat([b + index, index])
        logits = (torch.cat([z1, z2]) @ candidates.T).scatter(1, itself[:, None], float("-inf"))
        return 2 * F.cross_entropy(logits / temperature, positive)  # logits: 2Nx2B


# +-----------------------------------------------------------------------------------------+
# | MeanEnc: the target encoding of an image is the mean of n encodings of n views, then   |
# | l2-normalised. Averaging n noisy encodings divides their variance by about n: a        |
# | steadier target. (On the source, --mean-enc-source, it lowers the source's variance.)   |
# +-----------------------------------------------------------------------------------------+
def mean_encoding(z, n):
    """(n*N)xD encodings of n views (view-major) -> NxD mean (the loss normalises it)."""
    return z.float().view(n, -1, z.shape[-1]).mean(0)


def simsiam_std(z):
    """Std over the batch of l2-normalised encodings, averaged over channels, x sqrt(D):
    about 1 when spread on the sphere, 0 when collapsed (SimSiam's monitor)."""
    return (F.normalize(z.float(), dim=1).std(0).mean() * math.sqrt(z.shape[1])).item()


# =============================================================================================
# Step
# =============================================================================================
# +-----------------------------------------------------------------------------------------+
# | MultiCrop: m small, low-resolution crops each make a pair with the target encoding.    |
# | Small crops see little of the image, so their encodings vary more: higher source       |
# | variance. Loss = standard pair + the mean over the small-crop pairs (official weights). |
# +-----------------------------------------------------------------------------------------+
def train_step(source, target, batch, args):
    """One source/target pass and the loss. batch: {"source", "target", "source_small",
    "target_small"}, each (views*N)x3xHxW, view-major. -> loss, q, k (NxD, not normalised)."""
    m = args.multicrop
    standard = [batch["source"], batch["target"]] if args.sym else [batch["source"]]
    inputs = [torch.cat(standard)]  # --sym: both views in one forward, one BN batch: the original
    if "source_small" in batch:
        n = len(batch["source"]) // args.mean_enc_source  # N, the images in this process's batch
        small = batch["source_small"]
        inputs += list(small.split(n)) if args.multicrop_per_crop else [small]
    outputs = source(inputs)
    outputs[:1] = outputs[0].split([len(x) for x in standard])
    q = mean_encoding(outputs[0], args.mean_enc_source)
    if args.sym:  # the original SimCLR: the source encodes both views, gradients through both
        k = mean_encoding(outputs[1], args.mean_enc)
        loss = nt_xent_sym(q, k, args.temperature)
    else:
        k = mean_encoding(target_encode(target, batch["target"]), args.mean_enc)
        loss = nt_xent(q, k, args.temperature)

    # each kind of pair (a small crop on the source, the target or both) adds the mean over its
    # pairs, one NT-Xent per crop: a crop's batch is its own contrast. (Under --sym the small crops
    # meet the source's encodings of the target views, behind a stop-gradient.)
    if "source_small" in batch:
        q_small = torch.cat(outputs[1 + args.sym:]).chunk(m)  # m x NxD
        loss = loss + torch.stack([nt_xent(q_j, k, args.temperature) for q_j in q_small]).mean()
    if "target_small" in batch:
        k_small = target_encode(target, batch["target_small"]).chunk(m)
        loss = loss + torch.stack([nt_xent(q, k_j, args.temperature) for k_j in k_small]).mean()
    if "source_small" in batch and "target_small" in batch:  # all m x m pairs of small crops
        loss = loss + torch.stack([nt_xent(q_i, k_j, args.temperature)
                                   for q_i in q_small for k_j in k_small]).mean()
    return loss, q, k


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warm-up to `peak`, then half-cosine decay to 0, per step."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step is rescaled per weight tensor by the trust ratio
    eta * ||w|| / ||g + wd w|| (You et al. 2017). 1-D parameters (biases, BN) get neither
    weight decay nor the trust ratio, as in BYOL, SimCLR, MoCo v3 and Barlow Twins."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                update = w.grad
                if w.ndim > 1:
                    update = update.add(w, alpha=group["weight_decay"])
                    w_norm, update_norm = w.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (update_norm > 0),
                                        group["trust_coefficient"] * w_norm / update_norm, 1.0)
                    update = update * trust
                buf = self.state[w].setdefault("momentum_buffer", torch.zeros_like(w))
                buf.mul_(group["momentum"]).add_(update)
                w.add_(buf, alpha=-group["lr"])


def make_optimizer(source, args):
    """LARS over the source, as SimCLR; the loop sets its lr."""
    return LARS(source.parameters(), weight_decay=args.wd)


def check_args(args, train_set):
    """Impossible settings -> one InputError naming them all, before any work."""
    problems = augment.common_problems(args, len(train_set))
    if args.arch not in RESNETS:
        problems.append(f"--arch {args.arch} is not a torchvision ResNet ({', '.join(RESNETS)})"
                        + ("; ViTs: mocov3_asym.py" if args.arch.startswith("vit") else ""))
    if args.temperature <= 0:
        problems.append(f"--temperature {args.temperature} must be positive")
    if problems:
        raise augment.InputError("; ".join(problems))


# =============================================================================================
# Plumbing: data, checkpoint, log and monitors, loop, main (the same lines in all six scripts)
# =============================================================================================
def make_views(args):
    return augment.Views(args.image_size, FRAMEWORK, args.source_aug, args.target_aug,
                         n_source=args.mean_enc_source, n_target=args.mean_enc,
                         multicrop=args.multicrop, multicrop_on=args.multicrop_on,
                         scalemix_on=args.scalemix_on, device_aug=args.gpu_aug)


def make_datasets(args):
    """Training views, and the kNN monitor's bank (labelled train) and held-out split."""
    train_set = augment.dataset(args.data, "train", make_views(args), args.data_root, args.seed)
    eval_t = augment.eval_transform(args.image_size)
    bank_set = augment.dataset(args.data, "train_labeled", eval_t, args.data_root)
    test_set = augment.dataset(args.data, "test", eval_t, args.data_root)
    return train_set, bank_set, test_set


def train_loader(train_set, epoch, skip_batches, args):
    """This process's batches of `epoch`, from batch `skip_batches` on (a resumed epoch)."""
    sampler = torch.utils.data.DistributedSampler(train_set, world_size(), rank(), shuffle=True,
                                                  seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    local_batch = args.batch_size // world_size()
    indices = list(sampler)[skip_batches * local_batch:]
    train_set.epoch = epoch  # seeds the views: the same whatever the workers, processes, resume
    if args.data_on_device:  # views made on the device, seeded per (seed, epoch, batch, process)
        return train_set.batches(indices, local_batch, epoch, skip_batches, rank())
    return torch.utils.data.DataLoader(
        train_set, batch_size=local_batch, sampler=indices, num_workers=args.workers,
        collate_fn=augment.collate_views, pin_memory=torch.cuda.is_available(), drop_last=True,
        worker_init_fn=augment.ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed))  # not the global RNG: the model's


def eval_loader(dataset, args):
    """This process's shard (every world_size-th image) of a data set, in eval views."""
    shard = torch.utils.data.Subset(dataset, range(rank(), len(dataset), world_size()))
    return torch.utils.data.DataLoader(
        shard, batch_size=max(args.batch_size // world_size(), 64), num_workers=args.workers,
        pin_memory=torch.cuda.is_available(), worker_init_fn=augment.ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed))  # not the global RNG: the model's


# ---- checkpoint: written whole or not at all, resumed only into the same run -----------------
# The flags a resumed run may change (where it writes, how it is watched, how fast it runs); any
# other difference would make it another run, so resuming refuses it.
RESUMABLE = {"output_dir", "resume", "resume_anyway", "workers", "print_freq", "knn_every",
             "knn_k", "knn_t", "variance_every", "variance_images", "variance_views", "max_steps",
             "save_every", "dist_timeout", "compile", "data_root", "no_image_check", "epochs"}


def save_checkpoint(args, step, steps_per_epoch, state, evaluated=True):
    """Rank 0 writes backbone.pth (the source backbone, torchvision keys) and checkpoint.pth
    (`state`, the step, the RNG state, `evaluated`: False while its evaluations are owed), each to
    a .tmp file renamed over the old one: a kill leaves the last whole pair, nothing non-finite."""
    if rank() == 0:
        ckpt = {"framework": FRAMEWORK, "step": step, "steps_per_epoch": steps_per_epoch,
                "evaluated": evaluated, "args": vars(args),
                **{name: part.state_dict() for name, part in state.items()},
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state()
                        if torch.cuda.is_available() else None}}
        bad = augment.non_finite(ckpt)
        if bad:
            augment.end_run(1, f"error: training diverged by step {step}: non-finite values in "
                               f"{', '.join(bad[:3])}; the last checkpoint is kept")
        backbone = {k[len("backbone."):]: v for k, v in ckpt["source"].items()
                    if k.startswith("backbone.")}
        for obj, name in ((backbone, "backbone.pth"), (ckpt, "checkpoint.pth")):
            path = os.path.join(args.output_dir, name)
            torch.save(obj, path + ".tmp")  # the next save reuses the name: nothing piles up
            os.replace(path + ".tmp", path)
    if world_size() > 1:
        dist.barrier()  # nobody stops or exits while rank 0 writes


def read_checkpoint(args):
    """The run to continue: the output directory's own checkpoint if there is one (a requeued
    command continues where it stopped), else --resume's; checked before anything is loaded from
    it (a training checkpoint of this script, the same run). -> (path, checkpoint) or Nones."""
    path = os.path.join(args.output_dir, "checkpoint.pth")
    path = path if os.path.exists(path) else args.resume
    if not path:
        return None, None
    if not os.path.isfile(path):
        raise augment.InputError(f"--resume {path}: no such file")
    ckpt = augment.load_weights(path)  # one line for a file torch cannot or will not read
    if not isinstance(ckpt, dict) or not {"framework", "step", "args", "source"} <= ckpt.keys():
        raise augment.InputError(f"cannot resume from {path}: not a checkpoint.pth of a training "
                                 f"run (backbone.pth holds the backbone only)")
    if ckpt["framework"] != FRAMEWORK:
        raise augment.InputError(f"cannot resume from {path}: it holds a {ckpt['framework']} run; "
                                 f"continue it with {ckpt['framework']}_asym.py")
    changed = [f"--{k.replace('_', '-')} {v} -> {getattr(args, k)}"
               for k, v in ckpt["args"].items() if k not in RESUMABLE and getattr(args, k, v) != v]
    if changed and not args.resume_anyway:
        raise augment.InputError(f"cannot resume from {path}: this command changes its run "
                                 f"({', '.join(changed)}); --resume-anyway if that is intended")
    return path, ckpt


def restore(ckpt, path, state):
    """Load `state`'s parts (name -> module or optimizer) and the RNG state; -> step, evaluated."""
    try:
        for name, part in state.items():
            part.load_state_dict(ckpt[name])
    except (KeyError, RuntimeError, ValueError) as e:
        raise augment.InputError(f"cannot resume from {path}: {type(e).__name__}: "
                                 f"{' '.join(str(e).split()[:40])}") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])  # rank 0's, on every process
    return ckpt["step"], ckpt.get("evaluated", True)


# ---- log and monitors -------------------------------------------------------------------------
def log(args, record, progress=""):
    """Print `record` (after a step's `progress`) and append it to output-dir/log.jsonl (rank 0)."""
    if rank() == 0:
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in record.items() if not (progress and k == "step")]
        print(" | ".join([progress] * bool(progress) + [" ".join(shown)]), flush=True)
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def evaluate(source, target, loaders, device, args, step, steps_per_epoch, done):
    """The kNN top-1 of the source backbone and the variance monitor's v_source and v_target,
    where due (every --knn-every / --variance-every epochs and at the end), logged; -> them."""
    bank, test, probe = loaders
    epoch, monitors = step / steps_per_epoch, {}
    due = lambda every: every >= 0 and (done or every and epoch % every == 0)  # noqa: E731
    if due(args.knn_every):
        monitors["knn_top1"] = augment.knn_accuracy(source.backbone, bank, test, device, args)
        log(args, {"epoch": epoch, "step": step, "knn_top1": monitors["knn_top1"]})
    if due(args.variance_every):
        start = time.time()
        encode = lambda x, side: side_encode(source, target, x, side, args)  # noqa: E731
        record = augment.asymmetry_variance((source, target), encode, probe, device, args)
        log(args, {"epoch": epoch, "step": step, **record, "variance_time": time.time() - start})
        monitors.update(record)
    return monitors


# ---- the loop: checks agreed before any work; a stop signal agreed at logged steps -----------
def train(args):
    device = augment.init_distributed(args.dist_timeout)
    torch.backends.cudnn.benchmark = True
    with augment.agreed():  # each process checks alone; a problem on any: one line, exit code 2
        train_set, bank_set, test_set = make_datasets(args)
        check_args(args, train_set)
        resume, ckpt = read_checkpoint(args)
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            open(os.path.join(args.output_dir, "log.jsonl"), "a").close()
        except OSError as e:
            raise augment.InputError(f"cannot write to --output-dir {args.output_dir}: {e}")
    with augment.agreed():  # the processes share the image check: each gets every answer
        if args.skip_bad_images or not args.no_image_check:
            augment.check_images({"training images": train_set, "kNN bank images": bank_set,
                                  "kNN test images": test_set}, args.skip_bad_images, args.workers)
        if args.data_on_device:  # decoded into the device's memory now: bad settings stop here
            train_set = augment.OnDevice(train_set, args.workers)
        steps_per_epoch = len(train_set) // args.batch_size
        if ckpt and ckpt["steps_per_epoch"] != steps_per_epoch:
            raise augment.InputError(f"cannot resume from {resume}: {ckpt['steps_per_epoch']} "
                                     f"steps per epoch, this run {steps_per_epoch} (other data?)")
        probe = augment.probe_loader(test_set.base, make_views(args), args)
    source, target = build_encoders(args, device)
    optimizer = make_optimizer(source, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    state = {"source": source, "target": target, "optimizer": optimizer, "scaler": scaler}
    with augment.agreed():
        step, evaluated = restore(ckpt, resume, state) if ckpt else (0, True)
    total_steps, last = args.epochs * steps_per_epoch, min(args.epochs * steps_per_epoch,
                                                          args.max_steps or math.inf)
    if step >= last and evaluated:  # a rerun of a finished command
        return augment.say(f"already finished at step {step}: {resume}; nothing to do")
    augment.say(augment.start_line(FRAMEWORK, args, len(train_set), steps_per_epoch, step, last))
    source_ddp = nn.parallel.DistributedDataParallel(source) if world_size() > 1 else source
    source_forward, target_forward = source_ddp, target
    if args.compile:  # compiled forwards; the weights and checkpoints stay source's and target's
        source_forward, target_forward = (torch.compile(m, backend=args.compile)
                                          for m in (source_ddp, target))
    peak_lr = args.lr * args.batch_size / 256
    loaders = eval_loader(bank_set, args), eval_loader(test_set, args), probe
    if step:
        log(args, {"resumed": resume, "step": step})
    if not step or not evaluated:  # the initial encoder (the reference to beat), or owed ones
        monitors = evaluate(source, target, loaders, device, args, step, steps_per_epoch,
                            step == last)
        if step:  # saved as made: a rerun does not make them again
            save_checkpoint(args, step, steps_per_epoch, state)

    received = []  # SIGTERM, SIGUSR1, SIGINT: save and stop at the next logged step
    handlers = {sig: signal.signal(sig, lambda signum, _: received.append(signum) or
                                   signal.signal(signum, handlers[signum]))  # a second: as usual
                for sig in augment.STOP_SIGNALS}
    first, start, shown = step, time.time(), time.time()  # the ETA's pace; the last line's time
    try:
        while step < last:
            window_start, window_steps, data_time, tick, stop = time.time(), 0, 0.0, time.time(), 0
            for batch, _ in train_loader(train_set, step // steps_per_epoch,
                                         step % steps_per_epoch, args):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                batch = augment.finish_views(batch)  # --gpu-aug: the colour operations, here
                if args.channels_last:
                    batch = {k: v.to(memory_format=torch.channels_last) for k, v in batch.items()}
                data_time += time.time() - tick
                lr = learning_rate(step, total_steps, args.warmup_epochs * steps_per_epoch, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with augment.autocast(device, args.amp):
                    loss, q, k = train_step(source_forward, target_forward, batch, args)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                momentum_update(target, source, 0.0)  # the target is the source's clone: a copy
                step, window_steps = step + 1, window_steps + 1
                epoch_end = step % steps_per_epoch == 0 or step == last
                if step % args.print_freq == 0 or epoch_end:
                    x = torch.stack([loss.detach().float(), torch.tensor(float(bool(received)),
                                                                         device=device)])
                    if world_size() > 1:  # the global batch's loss; whether any process must stop
                        dist.all_reduce(x)
                    loss_value, stop = x[0].item() / world_size(), x[1].item() > 0
                    if not math.isfinite(loss_value):
                        augment.end_run(1, f"error: training diverged at step {step} (loss "
                                           f"{loss_value}); the last checkpoint is kept")
                    elapsed, shown = time.time() - window_start, time.time()
                    log(args, {"epoch": step / steps_per_epoch, "step": step, "loss": loss_value,
                               "lr": lr, "data_time": data_time / window_steps,
                               "step_time": elapsed / window_steps,
                               "images_per_s": args.batch_size * window_steps / elapsed,
                               "std_source": simsiam_std(q), "std_target": simsiam_std(k)},
                        augment.progress(step, last, first, start))
                    window_start, window_steps, data_time = time.time(), 0, 0.0
                elif time.time() - shown > 30:  # a line at least every 30 s whatever --print-freq
                    augment.say(augment.progress(step, last, first, start, args.batch_size))
                    shown = time.time()
                if stop or epoch_end:
                    break
                if args.save_every and step % args.save_every == 0:
                    save_checkpoint(args, step, steps_per_epoch, state)
                tick = time.time()
            if stop:  # saved at once; the evaluations due here wait for the resume
                save_checkpoint(args, step, steps_per_epoch, state, evaluated=not epoch_end)
                by = signal.Signals(received[0]).name if received else "a signal to another process"
                augment.end_run(augment.EXIT_STOPPED, f"stopped at step {step} by {by}: "
                                f"{args.output_dir}/checkpoint.pth holds it; the same command "
                                f"continues")
            monitors = evaluate(source, target, loaders, device, args, step, steps_per_epoch,
                                step == last)
            save_checkpoint(args, step, steps_per_epoch, state)  # killed before: the epoch again
        augment.say(augment.end_line(args, step, monitors))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@record  # under torchrun: a failing process's traceback and rank in torchrun's report
def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except augment.InputError as e:  # found while training (an image a data worker cannot read)
        where = f" (rank {rank()})" if world_size() > 1 else ""
        print(f"error{where}: {str(e).strip().splitlines()[-1]}", file=sys.stderr, flush=True)
        sys.exit(augment.EXIT_BAD_INPUT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
