"""SimCLR in asymmetric form, with every design of "On the Importance of Asymmetry for Siamese
Representation Learning" (Wang, Fan, Tian, Kihara, Chen, CVPR 2022).

Method in five lines:
    source views x_s, target views x_t of each image            (augment.Views, SimCLR recipe)
    q = normalize(source(x_s))         gradient-updated: ResNet + 3-layer MLP projector, 128-d
    k = normalize(target(x_t))         no gradient: a clone of the source (its weights at every step)
    loss = NT-Xent(q; k+, the other k and q of all devices)   one pair, once (--sym: the original)
    target <- source

Designs (the paper keeps the target's encoding variance below the source's):
    source: --multicrop [M], --scalemix, --asym-aug (StrongerAug)    raise variance
    target: --asym-aug (WeakerAug), --asym-bn (SyncBN), --mean-enc N   lower variance
    --multicrop-on / --scalemix-on / --syncbn-on source|target|both, --source-aug / --target-aug,
    --mean-enc-source N place each design anywhere, as in the paper's case studies.

Examples:
    python simclr_asym.py --data synthetic --arch resnet18 --image-size 32 --epochs 6 --batch-size 128 \\
        --lr 1.0 --warmup-epochs 1 --temperature 0.2 --bn-splits 4 --workers 2   # CPU minutes
    torchrun --nproc_per_node=8 simclr_asym.py --data /path/to/imagenet --multicrop --asym-bn --mean-enc 2
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import augment

# =============================================================================================
# Arguments
# =============================================================================================
RESNETS = [name for name in torchvision.models.list_models(module=torchvision.models)
           if name.startswith(("resnet", "resnext", "wide_resnet"))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SimCLR with the asymmetric designs of Wang et al. 2022",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="synthetic (built in) | cifar10 | cifar100 | stl10 | ImageFolder root with train/ and val/ or test/")
    g.add_argument("--data-root", default="data", help="where cifar10 / cifar100 / stl10 are looked for and downloaded")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images with a warning instead of stopping")
    g.add_argument("--image-size", type=int, default=224, help="standard crop size (32 for CIFAR; MultiCrop crops scale with it)")
    g.add_argument("--workers", type=int, default=-1,
                   help="data loading processes per process (-1: this node's CPUs over its processes, at most 16)")
    g.add_argument("--gpu-aug", action="store_true",
                   help="colour operations and normalisation batched on the device; workers only crop and flip (data-bound GPU runs: MultiCrop)")
    g.add_argument("--data-on-device", action="store_true",
                   help="keep the training images in the device's memory (uint8) and make every view there: small data sets (CIFAR, STL-10)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", help="any torchvision ResNet: " + ", ".join(RESNETS))
    g.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 first conv and no max-pool, for 32 px images")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=4096, help="global batch over all processes")
    g.add_argument("--lr", type=float, default=0.3, help="base learning rate per 256 images (lr = base x batch / 256)")
    g.add_argument("--wd", type=float, default=1e-6, help="weight decay (LARS; none on biases and BN)")
    g.add_argument("--warmup-epochs", type=float, default=10, help="linear warm-up, then cosine decay per step")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 (or fp16 without bf16 support) on CUDA, off on CPU")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on recent GPUs)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the forward of source and target (backend: inductor if none named); the first steps compile")
    g = p.add_argument_group("SimCLR")
    g.add_argument("--dim", type=int, default=128, help="encoding dimension (projector output)")
    g.add_argument("--mlp-dim", type=int, default=0, help="hidden width of the projector (0: the backbone's feature dimension)")
    g.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature T")
    g.add_argument("--sym", action="store_true",
                   help="the original SimCLR loss: the source encodes both views, each view's encoding is an anchor (gradients through both)")
    g.add_argument("--global-bn", action="store_true", help="SyncBN in every BN of source and target, as the original SimCLR")
    g.add_argument("--bn-splits", type=int, default=1,
                   help="normalise each process's batch in N groups in every per-process BN, to emulate N devices on one")
    g = p.add_argument_group("asymmetric designs (paper's preferred placement by default)")
    g.add_argument("--multicrop", type=int, nargs="?", const=6, default=0, metavar="M",
                   help="MultiCrop: M small crops (6 when given bare; 96 px at 224, scale 0.05-0.14) on the source; raises its variance")
    g.add_argument("--multicrop-on", choices=["source", "target", "both"], help="place MultiCrop (default source)")
    g.add_argument("--multicrop-per-crop", action="store_true",
                   help="one forward per small crop as the official code (BN per crop) instead of one forward for all")
    g.add_argument("--scalemix", action="store_true", help="ScaleMix: mix two views by a random box, on the source; raises its variance")
    g.add_argument("--scalemix-on", choices=["source", "target", "both"], help="place ScaleMix (implies --scalemix)")
    g.add_argument("--asym-aug", action="store_true", help="AsymAug: StrongerAug (+RandAugment) on the source, WeakerAug (crop+flip) on the target")
    g.add_argument("--source-aug", choices=["weaker", "default", "stronger"], help="source augmentation (overrides --asym-aug)")
    g.add_argument("--target-aug", choices=["weaker", "default", "stronger"], help="target augmentation (overrides --asym-aug)")
    g.add_argument("--asym-bn", action="store_true", help="AsymBN: SyncBN in the target projector (all processes); lowers its variance")
    g.add_argument("--syncbn-on", choices=["source", "target", "both"], help="place the projector SyncBN (implies --asym-bn)")
    g.add_argument("--syncbn-group-size", type=int, default=0, help="processes per SyncBN group (0: all; the official code used 8)")
    g.add_argument("--mean-enc", type=int, default=1, metavar="N",
                   help="MeanEnc: target encoding = normalised mean of N target views' encodings (paper: 2); lowers its variance")
    g.add_argument("--mean-enc-source", type=int, default=1, metavar="N", help="MeanEnc on the source: N source views averaged")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/simclr_asym", help="checkpoints and log.jsonl")
    g.add_argument("--resume", default="auto", help="auto (output-dir/checkpoint.pth if present) | none | a checkpoint path")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: run all epochs); the schedule is unchanged")
    g.add_argument("--print-freq", type=int, default=50, help="log every N steps")
    g.add_argument("--knn-every", type=int, default=10, help="kNN accuracy every N epochs and at the end (0: only at the end, -1: never)")
    g.add_argument("--knn-k", type=int, default=200, help="kNN neighbours")
    g.add_argument("--knn-t", type=float, default=0.1, help="kNN temperature (0.07 on ImageNet)")
    args = p.parse_args(argv)
    if args.workers < 0:  # the CPUs this process may use, shared with the other processes on its node
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.workers = min(16, max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    # resolve the designs' placements into plain values (the checkpoint stores them)
    if args.multicrop_on and not args.multicrop:
        args.multicrop = 6
    args.multicrop_on = args.multicrop_on or "source"
    args.scalemix_on = args.scalemix_on or ("source" if args.scalemix else None)
    args.source_aug = args.source_aug or ("stronger" if args.asym_aug else "default")
    args.target_aug = args.target_aug or ("weaker" if args.asym_aug else "default")
    args.syncbn_on = args.syncbn_on or ("target" if args.asym_bn else None)
    return args


# =============================================================================================
# Data and views
# =============================================================================================
def make_views(args):
    return augment.Views(args.image_size, "simclr", args.source_aug, args.target_aug,
                         n_source=args.mean_enc_source, n_target=args.mean_enc,
                         multicrop=args.multicrop, multicrop_on=args.multicrop_on, scalemix_on=args.scalemix_on,
                         device_aug=args.gpu_aug)


def make_datasets(args):
    """Training views, and the kNN monitor's bank (labelled train) and held-out split."""
    train_set = augment.dataset(args.data, "train", make_views(args), args.data_root, args.seed, args.skip_bad_images)
    if args.data_on_device:  # decoded into the device's memory here, so that bad settings stop before any work
        train_set = augment.OnDevice(train_set, args.workers)
    eval_t = augment.eval_transform(args.image_size)
    bank_set = augment.dataset(args.data, "train_labeled", eval_t, args.data_root, skip_bad=args.skip_bad_images)
    test_set = augment.dataset(args.data, "test", eval_t, args.data_root, skip_bad=args.skip_bad_images)
    return train_set, bank_set, test_set


def train_loader(train_set, epoch, skip_batches, args):
    """This process's batches of `epoch`, from batch `skip_batches` on (a resumed epoch)."""
    sampler = torch.utils.data.DistributedSampler(train_set, world_size(), rank(), shuffle=True,
                                                  seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    local_batch = args.batch_size // world_size()
    train_set.epoch = epoch  # seeds the views: the same views whatever the workers, world size or resume
    if args.data_on_device:  # views made on the device, seeded per (seed, epoch, batch, process)
        return train_set.batches(list(sampler)[skip_batches * local_batch:], local_batch, epoch, skip_batches, rank())
    return torch.utils.data.DataLoader(
        train_set, batch_size=local_batch, sampler=list(sampler)[skip_batches * local_batch:],
        num_workers=args.workers, collate_fn=augment.collate_views, pin_memory=torch.cuda.is_available(),
        drop_last=True)


def eval_loader(dataset, args):
    """This process's shard (every world_size-th image) of a data set, in eval views."""
    shard = torch.utils.data.Subset(dataset, range(rank(), len(dataset), world_size()))
    return torch.utils.data.DataLoader(shard, batch_size=max(args.batch_size // world_size(), 64),
                                       num_workers=args.workers, pin_memory=torch.cuda.is_available())


# =============================================================================================
# Model (and the collectives it needs; each is the identity on one process)
# =============================================================================================
def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(x):
    """Local NxC -> (world*N)xC in rank order, no gradient."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_gather_with_grad(x):
    """Local NxC -> (world*N)xC in rank order; the gradient of every process's loss reaches the
    process that encoded each row (summed), so the global batch is one loss, as on one device."""
    if world_size() == 1:
        return x
    return torch.cat(torch.distributed.nn.functional.all_gather(x))


def resnet_backbone(arch, cifar_stem, zero_init_residual=False):
    """torchvision ResNet without its fc (-> pooled features) and its feature dimension.
    zero_init_residual: each block starts as the identity (last BN scale 0), as some frameworks do."""
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
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False), Scale(out_dim))


class Encoder(nn.Module):
    """Backbone + projector, the same on source and target (SimCLR has no predictor)."""

    def __init__(self, args):
        super().__init__()
        self.backbone, f = resnet_backbone(args.arch, args.cifar_stem, zero_init_residual=True)
        self.projector = mlp(f, args.mlp_dim or f, args.dim)

    def forward(self, views):
        """List of N_ix3xHxW batches -> list of N_ixD outputs, in one call (so DDP sees one forward)."""
        return [self.projector(self.backbone(x)) for x in views]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with mean and variance all-reduced over a process group: nn.SyncBatchNorm's
    statistics where torch refuses it (CPU / gloo). The all-reduce passes gradients."""

    def __init__(self, num_features, group=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.group = group

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float32, device=x.device)
        stats = torch.cat([x.float().sum(dims), (x.float() ** 2).sum(dims), count])
        if world_size() > 1:
            stats = torch.distributed.nn.functional.all_reduce(stats, group=self.group or dist.group.WORLD)
        total, total_sq, n = stats.split([x.shape[1], x.shape[1], 1])
        mean, var = total / n, (total_sq / n - (total / n) ** 2).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm over `splits` groups of the batch (sample i in group i mod splits): the
    statistics `splits` devices would see, on one. Works for 1-d and 2-d inputs."""

    def __init__(self, num_features, splits, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        n, c, k = x.shape[0], x.shape[1], self.splits
        mean, var = self.running_mean.repeat(k), self.running_var.repeat(k)
        weight = self.weight.repeat(k) if self.affine else None
        bias = self.bias.repeat(k) if self.affine else None
        y = F.batch_norm(x.reshape(n // k, k * c, *x.shape[2:]), mean, var, weight, bias, True, self.momentum, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.copy_(mean.view(k, c).mean(0))
            self.running_var.copy_(var.view(k, c).mean(0))
        return y.view_as(x)


def replace_bn(module, make):
    """Replace every plain nn.BatchNorm1d/2d inside `module` by make(bn), keeping its state."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            new = make(child)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(child.weight.device if child.affine else child.running_mean.device))
        else:
            replace_bn(child, make)
    return module


def sync_bn(module, group):
    """SyncBN for every BN in `module`: nn.SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere."""
    if torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    return replace_bn(module, lambda bn: GlobalBatchNorm(bn.num_features, group, eps=bn.eps, momentum=bn.momentum, affine=bn.affine))


def syncbn_group(args):
    """This process's SyncBN group: all ranks, or consecutive groups of --syncbn-group-size."""
    size = args.syncbn_group_size or world_size()
    if size == world_size():
        return None
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world_size(), size)]
    return groups[rank() // size]


def build_encoders(args, device):
    """Source (gradient) and target (its clone, no gradient) with the BN of each placement."""
    torch.manual_seed(args.seed)
    source, target = Encoder(args).to(device), Encoder(args).to(device)
    target.load_state_dict(source.state_dict())
    group = syncbn_group(args)
    # +-------------------------------------------------------------------------------------+
    # | AsymBN: SyncBN in the target projector normalises by the statistics of the whole    |
    # | global batch instead of one device's, so the target encodings vary less with the     |
    # | batch they land in: lower target variance. (The source keeps per-device BN.)         |
    # +-------------------------------------------------------------------------------------+
    for name, encoder in (("source", source), ("target", target)):
        if args.syncbn_on in (name, "both"):
            encoder.projector = sync_bn(encoder.projector, group)
        if args.global_bn:  # the original SimCLR: every BN over the global batch
            sync_bn(encoder, None)
        if args.bn_splits > 1:  # every remaining per-device BN sees 1/splits of the batch
            replace_bn(encoder, lambda bn: SplitBatchNorm(bn.num_features, args.bn_splits, eps=bn.eps,
                                                          momentum=bn.momentum, affine=bn.affine))
    target.requires_grad_(False)
    if args.channels_last:
        source, target = source.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
    return source, target


@torch.no_grad()
def momentum_update(target, source, m):
    """target <- m * target + (1 - m) * source, over the target's parameters (BN statistics stay
    the target's own; the source's predictor has no counterpart)."""
    names = [name for name, _ in target.named_parameters()]
    torch._foreach_lerp_([target.get_parameter(n) for n in names], [source.get_parameter(n) for n in names], 1.0 - m)


@torch.no_grad()
def target_encode(target, x):
    """(n*N)x3xHxW -> (n*N)xD target encodings, no gradient (BN with this batch's statistics)."""
    return target([x])[0]


# =============================================================================================
# Loss
# =============================================================================================
def nt_xent(q, k, temperature):
    """Asymmetric NT-Xent. q: NxD source encodings, k: NxD target encodings (stop-gradient) of this
    process's N images, l2-normalised here; B = world * N images in the global batch.
    Anchors: this process's q_i, global index g = rank * N + i. Candidates of anchor g: the B target
    encodings k of the global batch (gathered, no gradient) and the B source encodings q (gathered
    with gradient), its own q_g masked out: 2B - 1, the positive k_g and 2B - 2 negatives, as in
    SimCLR. -> mean over the N anchors of -log softmax_c(q_g . c / T)[k_g] (the mean over the
    processes, as DDP averages, is the mean over the global batch)."""
    with torch.autocast(q.device.type, enabled=False):  # logits / T in float32
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        index = torch.arange(len(q), device=q.device) + rank() * len(q)  # global indices g: the labels
        to_k = q @ concat_all_gather(k.detach()).T  # NxB, positive at column g
        to_q = (q @ all_gather_with_grad(q).T).scatter(1, index[:, None], float("-inf"))  # NxB, not itself
        return F.cross_entropy(torch.cat([to_k, to_q], dim=1) / temperature, index)


def nt_xent_sym(z1, z2, temperature):
    """The original SimCLR loss. z1, z2: NxD source encodings (with gradient) of the two views of
    this process's N images, l2-normalised here; B = world * N. Candidates: the 2B encodings of the
    global batch [view 1 of all B images; view 2 of all B] (gathered with gradient). Anchors: this
    process's 2N encodings, image g = rank * N + i at rows g (view 1) and B + g (view 2) of the
    candidates; its own row masked out, the other view of its image the positive: 2B - 2
    negatives. -> mean over the 2N anchors (the original sums the two views' means: 2x this)."""
    with torch.autocast(z1.device.type, enabled=False):  # logits / T in float32
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        b = len(z1) * world_size()
        index = torch.arange(len(z1), device=z1.device) + rank() * len(z1)  # global indices g
        candidates = torch.cat(all_gather_with_grad(torch.cat([z1, z2], dim=1)).chunk(2, dim=1))  # 2BxD
        itself, positive = torch.cat([index, b + index]), torch.cat([b + index, index])
        logits = (torch.cat([z1, z2]) @ candidates.T).scatter(1, itself[:, None], float("-inf"))  # 2Nx2B
        return F.cross_entropy(logits / temperature, positive)


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
    "target_small"}, each (views*N)x3xHxW, view-major. -> loss, q (NxD), k (NxD), not normalised."""
    m = args.multicrop
    inputs = [batch["source"]]
    if args.sym:
        inputs.append(batch["target"])
    if "source_small" in batch:
        n = len(batch["source"]) // args.mean_enc_source  # N, the images in this process's batch
        inputs += list(batch["source_small"].split(n)) if args.multicrop_per_crop else [batch["source_small"]]
    outputs = source(inputs)
    q = mean_encoding(outputs[0], args.mean_enc_source)
    if args.sym:  # the original SimCLR: the source encodes both views, gradients through both
        k = mean_encoding(outputs[1], args.mean_enc)
        loss = nt_xent_sym(q, k, args.temperature)
    else:
        k = mean_encoding(target_encode(target, batch["target"]), args.mean_enc)
        loss = nt_xent(q, k, args.temperature)

    # each kind of pair (a small crop on the source, the target or both) adds the mean over its pairs,
    # one NT-Xent per crop: a crop's batch is its own contrast. (Under --sym the small crops meet the
    # source's encodings of the target views behind a stop-gradient, the clone target's values.)
    if "source_small" in batch:
        q_small = torch.cat(outputs[1 + args.sym:]).chunk(m)  # m x NxD
        loss = loss + torch.stack([nt_xent(q_j, k, args.temperature) for q_j in q_small]).mean()
    if "target_small" in batch:
        k_small = target_encode(target, batch["target_small"]).chunk(m)
        loss = loss + torch.stack([nt_xent(q, k_j, args.temperature) for k_j in k_small]).mean()
    if "source_small" in batch and "target_small" in batch:  # all m x m pairs of small crops
        loss = loss + torch.stack([nt_xent(q_i, k_j, args.temperature) for q_i in q_small for k_j in k_small]).mean()
    return loss, q, k


# =============================================================================================
# Loop and checkpoint
# =============================================================================================
def autocast(device, args):
    """Mixed precision of --amp (resolved to bf16 | fp16 | off)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warm-up to `peak`, then half-cosine decay to 0, per step."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step is rescaled per weight tensor by the trust ratio
    eta * ||w|| / ||g + wd w|| (You et al. 2017). 1-D parameters (biases, BN) get neither
    weight decay nor the trust ratio, as in BYOL, SimCLR, MoCo v3 and Barlow Twins."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient))

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


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, source, target, optimizer, scaler, args, steps_per_epoch):
    """Restore everything from `path`; -> the step to continue from. Bad files raise InputError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        source.load_state_dict(ckpt["source"])
        target.load_state_dict(ckpt["target"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except Exception as e:
        detail = " ".join(str(e).split())[:300]  # one line, e.g. the first mismatching key
        raise augment.InputError(f"cannot resume from {path}: {type(e).__name__}: {detail}") from None
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise augment.InputError(f"cannot resume from {path}: it has {ckpt['steps_per_epoch']} steps per epoch, "
                                 f"this run {steps_per_epoch} (other --batch-size or --data?)")
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["step"]


def save_checkpoint(args, step, steps_per_epoch, source, target, optimizer, scaler):
    """output-dir/checkpoint.pth (everything, to resume) and backbone.pth (torchvision keys, no fc)."""
    if rank() != 0:
        return
    save_atomic({
        "step": step, "epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch, "args": vars(args),
        "source": source.state_dict(), "target": target.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
    }, os.path.join(args.output_dir, "checkpoint.pth"))
    save_atomic(source.backbone.state_dict(), os.path.join(args.output_dir, "backbone.pth"))


@torch.no_grad()
def extract_features(backbone, loader, device, args):
    """l2-normalised backbone features and labels of a loader's images (eval mode)."""
    features, labels = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if args.channels_last:
            images = images.to(memory_format=torch.channels_last)
        with autocast(device, args):
            features.append(F.normalize(backbone(images).float(), dim=1))
        labels.append(y.to(device))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def gather_padded(x, fill):
    """Local rows of unequal counts -> all processes' rows, padded with `fill` to equal counts."""
    n = torch.tensor([len(x)], device=x.device)
    n_max = int(concat_all_gather(n).max())
    pad = torch.full((n_max - len(x), *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    return concat_all_gather(torch.cat([x, pad]))


@torch.no_grad()
def knn_accuracy(backbone, bank_loader, test_loader, device, args):
    """Top-1 (%) of a weighted kNN classifier (k, T) on backbone features. Each process keeps its
    shard of the bank; the k nearest of every shard are gathered and merged."""
    was_training = backbone.training
    backbone.eval()
    bank, bank_labels = extract_features(backbone, bank_loader, device, args)
    test, test_labels = extract_features(backbone, test_loader, device, args)
    test, test_labels = gather_padded(test, 0.0), gather_padded(test_labels, -1)  # every test image
    test, test_labels = test[test_labels >= 0], test_labels[test_labels >= 0]
    k = min(args.knn_k, int(concat_all_gather(torch.tensor([len(bank)], device=device)).min()))  # smallest shard
    sims, labels = [], []
    for chunk in test.split(1024):
        s, i = (chunk @ bank.T).topk(k, dim=1)  # cosine similarity to this shard's k nearest
        sims.append(s)
        labels.append(bank_labels[i])
    sims = torch.cat(concat_all_gather(torch.cat(sims)[None]).unbind(0), dim=1)  # Nx(world*k)
    labels = torch.cat(concat_all_gather(torch.cat(labels)[None]).unbind(0), dim=1)
    sims, top = sims.topk(k, dim=1)  # the k nearest of the whole bank
    weights = (sims / args.knn_t).exp()
    n_classes = int(max(labels.max(), test_labels.max())) + 1
    scores = torch.zeros(len(test), n_classes, device=device).scatter_add_(1, labels.gather(1, top), weights)
    backbone.train(was_training)
    return (scores.argmax(1) == test_labels).float().mean().item() * 100


def check_finite(loss_value, source, step, args):
    """Stop on a NaN or infinite loss or weight, before it reaches a checkpoint."""
    weights_finite = bool(torch.stack([p.isfinite().all() for p in source.parameters()]).all())
    if not (math.isfinite(loss_value) and weights_finite):
        raise FloatingPointError(f"training diverged at step {step} (loss {loss_value}, finite weights: {weights_finite}); "
                                 f"stopped without saving, the last good checkpoint in {args.output_dir} is intact")


def log(args, stats):
    if rank() == 0:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()), flush=True)
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(stats) + "\n")


def check_args(args, train_set):
    """Impossible settings as one clear error, before any work."""
    world, local = world_size(), args.batch_size // world_size()
    problems = []
    if args.arch not in RESNETS:
        problems.append(f"--arch {args.arch} is not a torchvision ResNet ({', '.join(RESNETS)})")
    if args.batch_size % world:
        problems.append(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    elif local % args.bn_splits or local // args.bn_splits < 2:
        problems.append(f"the per-process batch {local} must split into --bn-splits {args.bn_splits} groups of 2 or more")
    if len(train_set) < args.batch_size:
        problems.append(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    if args.syncbn_group_size and world % args.syncbn_group_size:
        problems.append(f"--syncbn-group-size {args.syncbn_group_size} does not divide the {world} processes")
    if args.mean_enc < 1 or args.mean_enc_source < 1 or args.multicrop < 0:
        problems.append("--mean-enc, --mean-enc-source and --multicrop must be positive")
    if args.temperature <= 0:
        problems.append(f"--temperature {args.temperature} must be positive")
    if problems:
        raise augment.InputError("; ".join(problems))


def train(args):
    if "WORLD_SIZE" in os.environ:  # torchrun: env:// rendezvous
        if torch.cuda.is_available():  # one GPU per process, named so NCCL need not guess it
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.amp == "auto":
        args.amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    torch.backends.cudnn.benchmark = True

    train_set, bank_set, test_set = make_datasets(args)
    check_args(args, train_set)
    os.makedirs(args.output_dir, exist_ok=True)
    source, target = build_encoders(args, device)
    source_ddp = nn.parallel.DistributedDataParallel(source) if world_size() > 1 else source
    source_forward, target_forward = source_ddp, target
    if args.compile:  # compiled forwards; the weights, optimizer and checkpoints stay those of source and target
        source_forward, target_forward = (torch.compile(m, backend=args.compile) for m in (source_ddp, target))
    optimizer = make_optimizer(source, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    peak_lr = args.lr * args.batch_size / 256

    step = 0
    resume = os.path.join(args.output_dir, "checkpoint.pth") if args.resume == "auto" else args.resume
    if resume != "none" and os.path.exists(resume):
        step = load_checkpoint(resume, source, target, optimizer, scaler, args, steps_per_epoch)
        log(args, {"resumed": resume, "step": step})
    elif args.resume not in ("auto", "none"):
        raise augment.InputError(f"--resume {args.resume}: no such file")
    bank_loader, test_loader = eval_loader(bank_set, args), eval_loader(test_set, args)
    last_step = min(total_steps, args.max_steps or total_steps)
    if step == 0 and args.knn_every > 0:  # the initial encoder's accuracy: the reference to beat
        log(args, {"epoch": 0.0, "step": 0, "knn_top1": knn_accuracy(source.backbone, bank_loader, test_loader, device, args)})

    while step < last_step:
        window_start, window_steps, data_time = time.time(), 0, 0.0
        tick = time.time()
        for batch, _ in train_loader(train_set, step // steps_per_epoch, step % steps_per_epoch, args):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch = augment.finish_views(batch)  # --gpu-aug: the views' colour operations, here on the device
            if args.channels_last:
                batch = {k: v.to(memory_format=torch.channels_last) for k, v in batch.items()}
            data_time += time.time() - tick
            lr = learning_rate(step, total_steps, args.warmup_epochs * steps_per_epoch, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, args):
                loss, p, z = train_step(source_forward, target_forward, batch, args)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            momentum_update(target, source, 0.0)  # the target is the source's clone: a copy (m = 0)
            step += 1
            window_steps += 1
            if step % args.print_freq == 0 or step == last_step or step % steps_per_epoch == 0:
                loss_value = loss.item()  # also waits for the GPU, so the window's times are real
                check_finite(loss_value, source, step, args)  # runs at every epoch end: guards the save below
                elapsed = time.time() - window_start
                log(args, {"epoch": step / steps_per_epoch, "step": step, "loss": loss_value, "lr": lr,
                           "data_time": data_time / window_steps,
                           "step_time": elapsed / window_steps, "images_per_s": args.batch_size * window_steps / elapsed,
                           "std_source": simsiam_std(p), "std_target": simsiam_std(z)})
                window_start, window_steps, data_time = time.time(), 0, 0.0
            if step == last_step:
                break
            tick = time.time()
        save_checkpoint(args, step, steps_per_epoch, source, target, optimizer, scaler)
        done = step == last_step
        if args.knn_every >= 0 and (done or (args.knn_every and step % (args.knn_every * steps_per_epoch) == 0)):
            log(args, {"epoch": step / steps_per_epoch, "step": step,
                       "knn_top1": knn_accuracy(source.backbone, bank_loader, test_loader, device, args)})
    if dist.is_initialized():
        dist.barrier()  # rank 0 hosts the rendezvous store: nobody leaves before all are done
        dist.destroy_process_group()


# =============================================================================================
# Main
# =============================================================================================
def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (augment.InputError, FloatingPointError) as e:  # from this process or a data worker
        if rank() == 0:  # a worker's error arrives as its traceback: keep its last line, the message
            message = str(e).strip().splitlines()[-1].split("InputError: ")[-1]
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, augment.InputError) else 1)


if __name__ == "__main__":
    main()
