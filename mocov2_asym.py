"""MoCo v2 in asymmetric form, with every design of "On the Importance of Asymmetry for Siamese
Representation Learning" (Wang, Fan, Tian, Kihara, Chen, CVPR 2022).

Method in five lines:
    source views x_s, target views x_t of each image            (augment.Views)
    q = normalize(source(x_s))         gradient-updated: ResNet + MLP projector, 128-d
    k = normalize(target(x_t))         no gradient: EMA of the source, BN shuffled across devices
    loss = InfoNCE(q, k+, queue of past k)   one pair, once (--sym adds the mirrored pair)
    enqueue k; target <- m * target + (1 - m) * source

Designs (the paper keeps the target's encoding variance below the source's):
    source: --multicrop [M], --scalemix, --asym-aug (StrongerAug)    raise variance
    target: --asym-aug (WeakerAug), --asym-bn (SyncBN), --mean-enc N   lower variance
    --multicrop-on / --scalemix-on / --syncbn-on source|target|both, --source-aug / --target-aug,
    --mean-enc-source N place each design anywhere, as in the paper's case studies.

Examples:
    python mocov2_asym.py --data synthetic --arch resnet18 --image-size 32 --epochs 6 --batch-size 128 \\
        --queue-size 1024 --lr 0.06 --warmup-epochs 1 --ema 0.99 --bn-splits 4 --workers 2   # CPU minutes
    torchrun --nproc_per_node=8 mocov2_asym.py --data /path/to/imagenet --multicrop --asym-bn --mean-enc 2
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
    p = argparse.ArgumentParser(description="MoCo v2 with the asymmetric designs of Wang et al. 2022",
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
    g.add_argument("--batch-size", type=int, default=256, help="global batch over all processes")
    g.add_argument("--lr", type=float, default=0.03, help="base learning rate per 256 images (lr = base x batch / 256)")
    g.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    g.add_argument("--warmup-epochs", type=float, default=0, help="linear warm-up, then cosine decay per step")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 (or fp16 without bf16 support) on CUDA, off on CPU")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on recent GPUs)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the forward of source and target (backend: inductor if none named); the first steps compile")
    g = p.add_argument_group("MoCo v2")
    g.add_argument("--dim", type=int, default=128, help="encoding dimension")
    g.add_argument("--queue-size", type=int, default=65536, help="K negatives; a multiple of the global batch (4096 on CIFAR)")
    g.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature T")
    g.add_argument("--ema", type=float, default=0.999, help="target momentum m: target <- m target + (1-m) source (0.99 on CIFAR)")
    g.add_argument("--sym", action="store_true", help="add the mirrored pair: source(target views) vs target(source views)")
    g.add_argument("--bn-splits", type=int, default=1,
                   help="normalise each process's target batch in N groups to emulate N devices (shuffled BN is a no-op on 1 process)")
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
    g.add_argument("--output-dir", default="runs/mocov2_asym", help="checkpoints and log.jsonl")
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
    return augment.Views(args.image_size, "mocov2", args.source_aug, args.target_aug,
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


class Encoder(nn.Module):
    """Backbone + MoCo v2 projector (the paper's: two hidden layers, one BN, biases on)."""

    def __init__(self, args):
        super().__init__()
        self.backbone, f = resnet_backbone(args.arch, args.cifar_stem)
        self.projector = nn.Sequential(nn.Linear(f, f), nn.BatchNorm1d(f), nn.ReLU(inplace=True),
                                       nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, args.dim))

    def forward(self, views):
        """List of N_ix3xHxW batches -> list of N_ixD encodings, in one call (so DDP sees one forward)."""
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
    """Source (gradient) and target (EMA copy, no gradient) with the BN of each placement."""
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
    if args.bn_splits > 1:  # every remaining per-device BN of the target sees 1/splits of the batch
        replace_bn(target, lambda bn: SplitBatchNorm(bn.num_features, args.bn_splits, eps=bn.eps,
                                                     momentum=bn.momentum, affine=bn.affine))
    target.requires_grad_(False)
    if args.channels_last:
        source, target = source.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
    return source, target


@torch.no_grad()
def momentum_update(target, source, m):
    """target <- m * target + (1 - m) * source, over parameters (BN statistics stay the target's own)."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1.0 - m)


@torch.no_grad()
def batch_shuffle(x):
    """Local NxCxHxW -> a random N of the global batch, and the order that undoes it."""
    if world_size() == 1:
        return x, None
    x_all = concat_all_gather(x)
    order = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(order, src=0)
    return x_all[order.view(world_size(), -1)[rank()]], torch.argsort(order)


@torch.no_grad()
def batch_unshuffle(z, undo):
    """Encodings of the shuffled batch -> this process's own rows, in its original order."""
    if undo is None:
        return z
    return concat_all_gather(z)[undo.view(world_size(), -1)[rank()]]


@torch.no_grad()
def target_encode(target, x):
    """(n*N)x3xHxW -> (n*N)xD target encodings; BN shuffled across processes (MoCo's shuffle BN)
    so that a source encoding and its target never share batch statistics."""
    x, undo = batch_shuffle(x)
    return batch_unshuffle(target([x])[0], undo)


class Queue(nn.Module):
    """K target encodings of past batches, the negatives of InfoNCE (KxD, oldest overwritten first)."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.ptr = 0

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys):
        keys = concat_all_gather(keys)  # local NxD -> global (world*N)xD
        self.keys[self.ptr:self.ptr + len(keys)] = keys  # K is a multiple of the global batch
        self.ptr = (self.ptr + len(keys)) % len(self.keys)

    def get_extra_state(self):
        return self.ptr

    def set_extra_state(self, ptr):
        self.ptr = ptr


# =============================================================================================
# Loss
# =============================================================================================
def infonce(q, k, queue, temperature):
    """q, k: NxD l2-normalised source / target encodings; queue: KxD negatives -> mean cross-entropy
    of picking k (the positive) among [k, queue] for each q."""
    with torch.autocast(q.device.type, enabled=False):  # logits in float32 even under --amp
        q, k = q.float(), k.float()
        positive = (q * k).sum(1, keepdim=True)  # Nx1
        negative = q @ queue.T  # NxK
        logits = torch.cat([positive, negative], dim=1) / temperature  # Nx(1+K)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


# +-----------------------------------------------------------------------------------------+
# | MeanEnc: the target encoding of an image is the mean of n encodings of n views, then   |
# | l2-normalised. Averaging n noisy encodings divides their variance by about n: a        |
# | steadier target. (On the source, --mean-enc-source, it lowers the source's variance.)   |
# +-----------------------------------------------------------------------------------------+
def mean_encoding(z, n):
    """(n*N)xD encodings of n views (view-major) -> NxD l2-normalised mean."""
    return F.normalize(z.float().view(n, -1, z.shape[-1]).mean(0), dim=1)


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
def train_step(source, target, queue, batch, args):
    """One source/target pass and the loss. batch: {"source", "target", "source_small",
    "target_small"}, each (views*N)x3xHxW, view-major. -> loss, q (NxD), keys to enqueue."""
    n = len(batch["source"]) // args.mean_enc_source  # N, the images in this process's batch
    m = args.multicrop
    inputs = [batch["source"]]
    if args.sym:
        inputs.append(batch["target"])
    if "source_small" in batch:
        inputs += list(batch["source_small"].split(n)) if args.multicrop_per_crop else [batch["source_small"]]
    outputs = source(inputs)
    q = mean_encoding(outputs[0], args.mean_enc_source)
    k = mean_encoding(target_encode(target, batch["target"]), args.mean_enc)
    loss = infonce(q, k, queue.keys, args.temperature)

    # each kind of pair (a small crop on the source, the target or both) adds the mean over its pairs;
    # small crops are view-major (m*N)xD, so repeating the standard encodings m times pairs them up
    if "source_small" in batch:
        q_small = F.normalize(torch.cat(outputs[1 + args.sym:]).float(), dim=1)
        loss = loss + infonce(q_small, k.repeat(m, 1), queue.keys, args.temperature)
    if "target_small" in batch:
        k_small = F.normalize(target_encode(target, batch["target_small"]).float(), dim=1)
        loss = loss + infonce(q.repeat(m, 1), k_small, queue.keys, args.temperature)
    if "source_small" in batch and "target_small" in batch:  # all m x m pairs of small crops
        every_q = q_small.view(m, 1, n, -1).expand(m, m, n, -1).reshape(m * m * n, -1)
        every_k = k_small.view(1, m, n, -1).expand(m, m, n, -1).reshape(m * m * n, -1)
        loss = loss + infonce(every_q, every_k, queue.keys, args.temperature)
    keys = [k]
    if args.sym:  # mirrored pair: the source encodes the target's views and vice versa
        q_mirror = mean_encoding(outputs[1], args.mean_enc)
        k_mirror = mean_encoding(target_encode(target, batch["source"]), args.mean_enc_source)
        loss = loss + infonce(q_mirror, k_mirror, queue.keys, args.temperature)
        keys.append(k_mirror)
    return loss, q, torch.cat(keys)


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


def make_optimizer(source, args):
    """SGD with momentum 0.9 and weight decay on every parameter, as MoCo v2; the loop sets its lr."""
    return torch.optim.SGD(source.parameters(), lr=0.0, momentum=0.9, weight_decay=args.wd)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, source, target, queue, optimizer, scaler, args, steps_per_epoch):
    """Restore everything from `path`; -> the step to continue from. Bad files raise InputError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        source.load_state_dict(ckpt["source"])
        target.load_state_dict(ckpt["target"])
        queue.load_state_dict(ckpt["queue"])
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
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])  # rank 0's: it draws the BN shuffle for all
    return ckpt["step"]


def save_checkpoint(args, step, steps_per_epoch, source, target, queue, optimizer, scaler):
    """output-dir/checkpoint.pth (everything, to resume) and backbone.pth (torchvision keys, no fc)."""
    if rank() != 0:
        return
    save_atomic({
        "step": step, "epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch, "args": vars(args),
        "source": source.state_dict(), "target": target.state_dict(), "queue": queue.state_dict(),
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
    keys_per_step = args.batch_size * (2 if args.sym else 1)
    if args.queue_size % keys_per_step:
        problems.append(f"--queue-size {args.queue_size} is not a multiple of the {keys_per_step} keys enqueued per step")
    if len(train_set) < args.batch_size:
        problems.append(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    if args.syncbn_group_size and world % args.syncbn_group_size:
        problems.append(f"--syncbn-group-size {args.syncbn_group_size} does not divide the {world} processes")
    if args.mean_enc < 1 or args.mean_enc_source < 1 or args.multicrop < 0:
        problems.append("--mean-enc, --mean-enc-source and --multicrop must be positive")
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
    queue = Queue(args.queue_size, args.dim).to(device)
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
        step = load_checkpoint(resume, source, target, queue, optimizer, scaler, args, steps_per_epoch)
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
                loss, q, keys = train_step(source_forward, target_forward, queue, batch, args)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            momentum_update(target, source, args.ema)
            queue.dequeue_and_enqueue(keys)
            step += 1
            window_steps += 1
            if step % args.print_freq == 0 or step == last_step or step % steps_per_epoch == 0:
                loss_value = loss.item()  # also waits for the GPU, so the window's times are real
                check_finite(loss_value, source, step, args)  # runs at every epoch end: guards the save below
                elapsed = time.time() - window_start
                log(args, {"epoch": step / steps_per_epoch, "step": step, "loss": loss_value, "lr": lr,
                           "data_time": data_time / window_steps, "step_time": elapsed / window_steps,
                           "images_per_s": args.batch_size * window_steps / elapsed,
                           "std_source": simsiam_std(q), "std_target": simsiam_std(keys[:len(q)])})
                window_start, window_steps, data_time = time.time(), 0, 0.0
            if step == last_step:
                break
            tick = time.time()
        save_checkpoint(args, step, steps_per_epoch, source, target, queue, optimizer, scaler)
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
