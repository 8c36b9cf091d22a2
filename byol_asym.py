"""BYOL in asymmetric form, with every design of "On the Importance of Asymmetry for Siamese
Representation Learning" (Wang, Fan, Tian, Kihara, Chen, CVPR 2022).

Method in five lines:
    source views x_s, target views x_t of each image            (augment.Views, BYOL recipe)
    p = predictor(source(x_s))         gradient-updated: ResNet + MLP projector 256-d + MLP predictor
    z = target(x_t)                    no gradient: EMA of the source (momentum 0.99 -> 1, cosine)
    loss = 2 - 2 cos(p, z)             one pair, once (--sym: the original's both directions)
    target <- m * target + (1 - m) * source

Designs (the paper keeps the target's encoding variance below the source's):
    source: --multicrop [M], --scalemix, --asym-aug (StrongerAug)    raise variance
    target: --asym-aug (WeakerAug), --asym-bn (SyncBN), --mean-enc N   lower variance
    --multicrop-on / --scalemix-on / --syncbn-on source|target|both, --source-aug / --target-aug,
    --mean-enc-source N place each design anywhere, as in the paper's case studies.

Examples:
    python byol_asym.py --data synthetic --arch resnet18 --image-size 32 --epochs 6 --batch-size 128 \\
        --lr 1.0 --warmup-epochs 1 --mlp-dim 1024 --bn-splits 4 --workers 2   # CPU minutes
    torchrun --nproc_per_node=8 byol_asym.py --data /path/to/imagenet --multicrop --asym-bn --mean-enc 2
"""
import argparse
import datetime
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
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
    p = argparse.ArgumentParser(description="BYOL with the asymmetric designs of Wang et al. 2022",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="synthetic (built in) | cifar10 | cifar100 | stl10 | ImageFolder root with train/ and val/ or test/")
    g.add_argument("--data-root", default="data", help="where cifar10 / cifar100 / stl10 are looked for and downloaded")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out (every image decoded once before training, cached) instead of stopping with an error that names them")
    g.add_argument("--no-image-check", action="store_true",
                   help="skip the header check of every image before training (cached per data set); an unreadable image then stops the run when it is reached")
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
    g.add_argument("--lr", type=float, default=0.45, help="base learning rate per 256 images (lr = base x batch / 256; 0.3 for 300 epochs, 0.2 for 1000)")
    g.add_argument("--wd", type=float, default=1e-6, help="weight decay (LARS; none on biases and BN)")
    g.add_argument("--warmup-epochs", type=float, default=10, help="linear warm-up, then cosine decay per step")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 (or fp16 without bf16 support) on CUDA, off on CPU")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on recent GPUs)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the forward of source and target (backend: inductor if none named); the first steps compile")
    g = p.add_argument_group("BYOL")
    g.add_argument("--dim", type=int, default=256, help="encoding dimension (projector and predictor output)")
    g.add_argument("--mlp-dim", type=int, default=4096, help="hidden width of projector and predictor")
    g.add_argument("--ema", type=float, default=0.99, help="target momentum m at step 0, raised to 1 by a cosine (0.996 for 1000 epochs)")
    g.add_argument("--sym", action="store_true", help="the original symmetrized loss: each view is once source, once target")
    g.add_argument("--global-bn", action="store_true", help="SyncBN in every BN of source and target, as the original BYOL")
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
    g.add_argument("--output-dir", default="runs/byol_asym", help="checkpoints and log.jsonl")
    g.add_argument("--resume", default="auto",
                   help="auto (output-dir/checkpoint.pth if present) | none (start afresh) | a checkpoint to start from "
                        "(output-dir/checkpoint.pth, once there, wins: a requeued command continues its own run)")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume even though the command changes flags of the checkpoint's run (listed otherwise as an error)")
    g.add_argument("--save-every", type=int, default=0, help="also save a checkpoint every N steps (0: at epoch ends only)")
    g.add_argument("--dist-timeout", type=float, default=10,
                   help="minutes a process waits for the others (a hung or dead process) before the run stops with an error")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: run all epochs); the schedule is unchanged")
    g.add_argument("--print-freq", type=int, default=50, help="log every N steps")
    g.add_argument("--knn-every", type=int, default=10, help="kNN accuracy every N epochs and at the end (0: only at the end, -1: never)")
    g.add_argument("--knn-k", type=int, default=200, help="kNN neighbours")
    g.add_argument("--knn-t", type=float, default=0.1, help="kNN temperature (0.07 on ImageNet)")
    g.add_argument("--variance-every", type=int,
                   help="the variance monitor (the paper's v_source and v_target; README: Watching the asymmetry) every N "
                        "epochs and at the end (0: only at the end, -1: never; default: --knn-every's)")
    g.add_argument("--variance-images", type=int, default=256,
                   help="variance monitor: the first N held-out images (fewer if the split has fewer), in whole BN batches")
    g.add_argument("--variance-views", type=int, default=8, metavar="R",
                   help="variance monitor: R draws of each image's training views, per side (the paper's Fig. 2: 32)")
    args = p.parse_args(argv)
    if args.workers < 0:  # the CPUs this process may use, shared with the other processes on its node
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.workers = min(16, max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    args.variance_every = args.knn_every if args.variance_every is None else args.variance_every  # with the kNN monitor
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
    return augment.Views(args.image_size, "byol", args.source_aug, args.target_aug,
                         n_source=args.mean_enc_source, n_target=args.mean_enc,
                         multicrop=args.multicrop, multicrop_on=args.multicrop_on, scalemix_on=args.scalemix_on,
                         device_aug=args.gpu_aug)


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
    train_set.epoch = epoch  # seeds the views: the same views whatever the workers, world size or resume
    if args.data_on_device:  # views made on the device, seeded per (seed, epoch, batch, process)
        return train_set.batches(list(sampler)[skip_batches * local_batch:], local_batch, epoch, skip_batches, rank())
    return torch.utils.data.DataLoader(
        train_set, batch_size=local_batch, sampler=list(sampler)[skip_batches * local_batch:],
        num_workers=args.workers, collate_fn=augment.collate_views, pin_memory=torch.cuda.is_available(),
        drop_last=True, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed))  # its own: the global RNG stays the model's


def eval_loader(dataset, args):
    """This process's shard (every world_size-th image) of a data set, in eval views."""
    shard = torch.utils.data.Subset(dataset, range(rank(), len(dataset), world_size()))
    return torch.utils.data.DataLoader(shard, batch_size=max(args.batch_size // world_size(), 64),
                                       num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed))


# =============================================================================================
# Model (and the collectives it needs; each is the identity on one process)
# =============================================================================================
def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(x):
    """Local NxC -> (world*N)xC in rank order, no gradient (detached on one process too)."""
    if world_size() == 1:
        return x.detach()
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


def mlp(in_dim, hidden_dim, out_dim):
    """BYOL's MLP: Linear, BN, ReLU, Linear (no bias: its output is only compared by angle)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))


class Encoder(nn.Module):
    """Backbone + projector, and on the source the predictor (which the target lacks)."""

    def __init__(self, args, predictor):
        super().__init__()
        self.backbone, f = resnet_backbone(args.arch, args.cifar_stem)
        self.projector = mlp(f, args.mlp_dim, args.dim)
        self.predictor = mlp(args.dim, args.mlp_dim, args.dim) if predictor else nn.Identity()

    def forward(self, views):
        """List of N_ix3xHxW batches -> list of N_ixD outputs, in one call (so DDP sees one forward)."""
        return [self.predictor(self.projector(self.backbone(x))) for x in views]


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
    statistics `splits` devices would see, on one. Its running statistics are the mean of the
    `splits` devices' own (a real multi-device run saves device 0's). Works for 1-d and 2-d inputs."""

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
    """Source (gradient) and target (EMA copy without predictor, no gradient) with the BN of each placement."""
    torch.manual_seed(args.seed)
    source, target = Encoder(args, predictor=True).to(device), Encoder(args, predictor=False).to(device)
    target.load_state_dict(source.state_dict(), strict=False)  # all but the predictor
    group = syncbn_group(args)
    # +-------------------------------------------------------------------------------------+
    # | AsymBN: SyncBN in the target projector normalises by the statistics of the whole    |
    # | global batch instead of one device's, so the target encodings vary less with the     |
    # | batch they land in: lower target variance. (The source keeps per-device BN.)         |
    # +-------------------------------------------------------------------------------------+
    for name, encoder in (("source", source), ("target", target)):
        if args.syncbn_on in (name, "both"):
            encoder.projector = sync_bn(encoder.projector, group)
        if args.global_bn:  # the original BYOL: every BN over the global batch
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


@torch.no_grad()
def side_encode(source, target, x, side, args):
    """(n*N)x3xHxW views of one side -> (n*N)xD encodings as the variance monitor measures them: the
    projector's output (a predictor left out, as the paper measures); the target's as training
    encodes them."""
    if side == "source":
        return source.projector(source.backbone(x))
    return target_encode(target, x)


# =============================================================================================
# Loss
# =============================================================================================
def byol_loss(p, z):
    """p: NxD source predictions, z: NxD target encodings -> mean of 2 - 2 cos(p, z)."""
    return (2 - 2 * (F.normalize(p.float(), dim=1) * F.normalize(z.float(), dim=1)).sum(1)).mean()


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
    "target_small"}, each (views*N)x3xHxW, view-major. -> loss, p (NxD), z (NxD)."""
    n = len(batch["source"]) // args.mean_enc_source  # N, the images in this process's batch
    m = args.multicrop
    inputs = [batch["source"]]
    if args.sym:
        inputs.append(batch["target"])
    if "source_small" in batch:
        inputs += list(batch["source_small"].split(n)) if args.multicrop_per_crop else [batch["source_small"]]
    outputs = source(inputs)
    p = mean_encoding(outputs[0], args.mean_enc_source)
    z = mean_encoding(target_encode(target, batch["target"]), args.mean_enc)
    loss = byol_loss(p, z)

    # each kind of pair (a small crop on the source, the target or both) adds the mean over its pairs;
    # small crops are view-major (m*N)xD, so repeating the standard encodings m times pairs them up
    if "source_small" in batch:
        p_small = torch.cat(outputs[1 + args.sym:])
        loss = loss + byol_loss(p_small, z.repeat(m, 1))
    if "target_small" in batch:
        z_small = target_encode(target, batch["target_small"])
        loss = loss + byol_loss(p.repeat(m, 1), z_small)
    if "source_small" in batch and "target_small" in batch:  # all m x m pairs of small crops
        every_p = p_small.view(m, 1, n, -1).expand(m, m, n, -1).reshape(m * m * n, -1)
        every_z = z_small.view(1, m, n, -1).expand(m, m, n, -1).reshape(m * m * n, -1)
        loss = loss + byol_loss(every_p, every_z)
    if args.sym:  # mirrored pair: the source encodes the target's views and vice versa
        p_mirror = mean_encoding(outputs[1], args.mean_enc)
        z_mirror = mean_encoding(target_encode(target, batch["source"]), args.mean_enc_source)
        loss = loss + byol_loss(p_mirror, z_mirror)
    return loss, p, z


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


def target_momentum(step, total_steps, base):
    """EMA momentum raised from `base` at step 0 to 1 at the end by a half-cosine, per step."""
    return 1 - (1 - base) * 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))


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
    """LARS over the source, as BYOL; the loop sets its lr."""
    return LARS(source.parameters(), weight_decay=args.wd)


def save_atomic(obj, path):
    """Write to a temporary file of its own, then rename: a crash mid-write never leaves a broken
    checkpoint, and a failed write (a full disk) leaves the previous file as it was."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def non_finite(tree, prefix=""):
    """The names of the floating-point tensors holding NaN or infinity in a nest of dicts and lists."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not bool(tree.isfinite().all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [name for key, value in items for name in non_finite(value, f"{prefix}.{key}" if prefix else str(key))]


# Flags that may differ when a run resumes: where it writes, how it is watched, how fast it runs.
# Every other flag changes the run, so a difference stops the resume (unless --resume-anyway).
RESUMABLE_FLAGS = ("output_dir", "resume", "resume_anyway", "workers", "print_freq", "knn_every", "knn_k", "knn_t",
                   "variance_every", "variance_images", "variance_views",
                   "max_steps", "save_every", "dist_timeout", "compile", "data_root", "no_image_check", "epochs")


def changed_flags(saved, args):
    """The flags of `args` that change the run and differ from the checkpoint's (--epochs may grow)."""
    changed = [k for k, v in vars(args).items() if k in saved and k not in RESUMABLE_FLAGS and saved[k] != v]
    if args.epochs < saved.get("epochs", args.epochs):
        changed.append("epochs")
    return [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in changed]


def read_checkpoint(path, args, steps_per_epoch):
    """The checkpoint at `path`, checked before anything is loaded from it: weights only, every tensor
    finite, the same run (flags, steps per epoch). Problems raise InputError."""
    try:
        ckpt = augment.load_weights(path)  # one clean line for a file that is not a checkpoint or holds objects
    except augment.InputError as e:
        raise augment.InputError(f"cannot resume: {e}") from None
    bad = non_finite(ckpt)
    if bad:
        raise augment.InputError(f"cannot resume from {path}: non-finite values in {len(bad)} tensors ({', '.join(bad[:3])})")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise augment.InputError(f"cannot resume from {path}: it has {ckpt['steps_per_epoch']} steps per epoch, "
                                 f"this run {steps_per_epoch} (other --batch-size or --data?)")
    changed = changed_flags(ckpt["args"], args)
    if changed and not args.resume_anyway:
        raise augment.InputError(f"cannot resume from {path}: this command changes its run ({', '.join(changed)}); "
                                 f"pass --resume-anyway if that is intended")
    return ckpt


def restore(ckpt, path, state):
    """Load every part of `state` (name -> module or optimizer) and the random state; -> the step."""
    try:
        for name, part in state.items():
            part.load_state_dict(ckpt[name])
    except Exception as e:
        detail = " ".join(str(e).split())[:300]  # one line, e.g. the first mismatching key
        raise augment.InputError(f"cannot resume from {path}: {type(e).__name__}: {detail}") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])  # rank 0's, on every process
    return ckpt["step"]


def on_disk(args):
    """What the output directory holds now, read back from the file, for messages."""
    path = os.path.join(args.output_dir, "checkpoint.pth")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f"{path} holds step {ckpt['step']} (epoch {ckpt['epoch']:.2f})"
    except FileNotFoundError:
        return f"no checkpoint was written to {args.output_dir}"
    except Exception:
        return f"{path} cannot be read back"


def save_checkpoint(args, step, steps_per_epoch, state, control):
    """output-dir/backbone.pth (torchvision keys, no fc), then checkpoint.pth (everything, to resume),
    written by rank 0 once every process has found its whole state finite; -> the step saved. The
    backbone goes first: a kill between the two renames leaves the older checkpoint, and the rerun
    from it writes both again."""
    ckpt = {"step": step, "epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch, "args": vars(args),
            **{name: part.state_dict() for name, part in state.items()},
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    bad = non_finite(ckpt)
    failure = FloatingPointError(f"training diverged by step {step}: non-finite values in {len(bad)} tensors "
                                 f"({', '.join(bad[:3])}); nothing saved, {on_disk(args)}") if bad else None
    agree(False, failure, control)
    if rank() == 0:
        backbone = {k[len("backbone."):]: v for k, v in ckpt["source"].items() if k.startswith("backbone.")}
        try:
            save_atomic(backbone, os.path.join(args.output_dir, "backbone.pth"))
            save_atomic(ckpt, os.path.join(args.output_dir, "checkpoint.pth"))
        except OSError as e:  # a full disk, a lost mount
            failure = augment.InputError(f"cannot save to {args.output_dir}: {e.strerror or e}; {on_disk(args)}")
    agree(False, failure, control)
    return step


def lock_output_dir(args):
    """Rank 0: create the output directory and take its lock for the run (one training per directory:
    a second one stops with the first one's pid and host). -> the open lock file (closing releases it)."""
    if rank() != 0:
        return None
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        lock = open(os.path.join(args.output_dir, "lock"), "a+")
    except OSError as e:
        raise augment.InputError(f"cannot write to --output-dir {args.output_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise augment.InputError(f"--output-dir {args.output_dir} is in use by {holder}: one training per directory") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def check_room(args, state):
    """Rank 0: the output directory must have room for two checkpoints (the atomic save writes the new
    one beside the old), the optimizer's buffers (made at its first step) counted as two per weight."""
    if rank() != 0:
        return
    tensors = [t for part in state.values() for t in part.state_dict().values() if isinstance(t, torch.Tensor)]
    weights = list(state["source"].parameters())
    need = 2 * sum(t.numel() * t.element_size() for t in tensors + weights + weights)
    free = shutil.disk_usage(args.output_dir).free
    if free < need:
        raise augment.InputError(f"--output-dir {args.output_dir} has {free / 2**20:.0f} MiB free; "
                                 f"two checkpoints need {need / 2**20:.0f} MiB")


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


# ---- the variance monitor: the paper's source and target variance while it trains ---------------
# +-----------------------------------------------------------------------------------------+
# | The paper's central quantity (Fig. 2): how much the l2-normalised encodings of an image |
# | spread over its views. Keep the target's below the source's: designs that raise it     |
# | belong on the source, those that lower it on the target. Each side is measured with    |
# | its own views (its recipe and designs) and its own BN (AsymBN), as training encodes    |
# | it; variance.py --sides gives the same numbers for a checkpoint.                       |
# +-----------------------------------------------------------------------------------------+
def probe_batches(n_images, args):
    """The variance monitor's BN batches: global batches of G = min(--batch-size, images) consecutive
    images, G a multiple of the devices (processes x --bn-splits), each split among the processes as
    training's sampler splits a batch (image k to process k mod world), so that --bn-splits k on one
    process is k processes. -> for each batch and draw j < r, this process's items (image x r + j)."""
    devices, r = world_size() * args.bn_splits, args.variance_views
    g = min(args.batch_size, n_images) // devices * devices
    if g < 2 * devices:
        raise augment.InputError(f"the variance monitor needs {2 * devices} or more held-out images (BN batches of 2 per "
                                 f"device), the split has {n_images}: pass --variance-every -1")
    return [[image * r + j for image in range(start + rank(), start + g, world_size())]
            for start in range(0, n_images - g + 1, g) for j in range(r)]


def probe_loader(held_out, args):
    """The variance monitor's probe set: the first --variance-images held-out images (a data set of
    images), each drawn --variance-views times with the training views (make_views: every side's
    recipe and designs), each draw seeded by its image and number: the same views at every evaluation.
    A batch is one draw of one BN batch's images (probe_batches), view-major as training's."""
    n = min(args.variance_images, len(held_out))
    draws = augment.Draws(torch.utils.data.Subset(held_out, range(n)), args.variance_views)
    return torch.utils.data.DataLoader(augment.SeededDataset(draws, make_views(args), args.seed),
                                       batch_sampler=probe_batches(n, args), num_workers=args.workers,
                                       collate_fn=augment.collate_views, pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed))


@torch.no_grad()
def side_encodings(source, target, batch, side, args):
    """One draw of a side's views -> its encodings, each NxD: the standard views' (MeanEnc: the mean of
    the n encodings, un-normalised; the n views in one forward, as in training) and, where MultiCrop
    is on this side, each small crop's (in one forward, or one per crop as --multicrop-per-crop)."""
    n = args.mean_enc_source if side == "source" else args.mean_enc
    z = side_encode(source, target, batch[side], side, args).float()
    encodings = [z.view(n, -1, z.shape[-1]).mean(0)]
    if side + "_small" in batch:
        small = batch[side + "_small"]
        crops = small.chunk(args.multicrop) if args.multicrop_per_crop and side == "source" else [small]
        encodings += torch.cat([side_encode(source, target, x, side, args) for x in crops]).float().chunk(args.multicrop)
    return encodings


@torch.no_grad()
def asymmetry_variance(source, target, loader, device, args):
    """The paper's variance of each side on the probe set (probe_loader): per image, the variance of
    its K l2-normalised encodings (augment.intra_sample_variance), K = r draws x (1 + m) where
    MultiCrop's m small crops are on that side (pooled with the standard views'), else r; v = the
    mean over the images. BN in train mode with each batch's statistics, as in training. The training
    state is left as it was: BN running statistics restored, the random state forked (MoCo v2's BN
    shuffle draws from it: here from --seed, the same at every evaluation). -> {v_source, v_target,
    v_ratio (target / source), v_uniform_source and v_uniform_target ((1 - 1/K)/d, encodings uniform
    on the sphere), v_std_source and v_std_target (SimSiam's std x sqrt(d) of each draw's standard
    encodings over the images, averaged over the draws)}."""
    sides, r = ("source", "target"), args.variance_views
    modes = [encoder.training for encoder in (source, target)]
    buffers = [b.clone() for encoder in (source, target) for b in encoder.buffers()]  # BN running statistics
    sums = {side: torch.zeros(2, dtype=torch.float64, device=device) for side in sides}  # sum of v over images, images
    moments, k = {}, {}  # side -> 2 x r x D: sum and sum of squares over the images of each draw's standard encodings; K
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(args.seed)
        source.train()
        target.train()
        draws = {side: [] for side in sides}
        for i, (batch, _) in enumerate(loader):
            batch = augment.finish_views({kind: x.to(device, non_blocking=True) for kind, x in batch.items()})
            if args.channels_last:
                batch = {kind: x.to(memory_format=torch.channels_last) for kind, x in batch.items()}
            with autocast(device, args):
                for side in sides:
                    draws[side].append(side_encodings(source, target, batch, side, args))
            if i % r < r - 1:
                continue
            for side in sides:  # the r draws of this batch's images are in
                z = torch.stack([e for draw in draws[side] for e in draw])  # KxNxD
                v = augment.intra_sample_variance(z)  # N
                sums[side][0] += v.double().sum()
                sums[side][1] += len(v)
                u = F.normalize(torch.stack([draw[0] for draw in draws[side]]).double(), dim=-1)  # rxNxD
                moments[side] = moments.get(side, 0) + torch.stack([u.sum(1), (u ** 2).sum(1)])  # 2xrxD
                k[side], draws[side] = len(z), []
    for b, saved in zip([b for encoder in (source, target) for b in encoder.buffers()], buffers):
        b.copy_(saved)
    for encoder, mode in zip((source, target), modes):
        encoder.train(mode)
    stats = torch.cat([torch.cat([sums[side], moments[side].flatten()]) for side in sides])  # one all-reduce
    if world_size() > 1:
        dist.all_reduce(stats)
    record = {}
    for side, part in zip(sides, stats.split(len(stats) // 2)):
        (v_sum, n), (s1, s2) = part[:2], part[2:].view(moments[side].shape)
        std = ((s2 - s1 ** 2 / n) / (n - 1)).clamp(min=0).sqrt()  # rxD: per draw and dimension, over the images
        d = std.shape[1]
        record.update({f"v_{side}": (v_sum / n).item(), f"v_uniform_{side}": augment.uniform_reference(k[side], d),
                       f"v_std_{side}": (std.mean(1) * math.sqrt(d)).mean().item()})
    return {"v_source": record["v_source"], "v_target": record["v_target"], "v_ratio": record["v_target"] / record["v_source"],
            **{key: record[key] for key in ("v_uniform_source", "v_uniform_target", "v_std_source", "v_std_target")}}


def variance_warning(records):
    """One line once v_target > v_source at two evaluations in a row (records: the monitor's, in
    order); None otherwise, and while such a streak goes on. The initial evaluation does not count:
    the target starts as the source's copy, so there the two differ only by their views' draws."""
    records = [record for record in records if record["step"] > 0]
    above = [record["v_target"] > record["v_source"] for record in records]
    if above[-2:] != [True, True] or above[-3:-2] == [True]:
        return None
    first, last = records[-2:]
    return (f"v_target > v_source at two evaluations in a row (epochs {first['epoch']:g} and {last['epoch']:g}: "
            f"{last['v_target']:.3g} > {last['v_source']:.3g}); the paper finds that a target whose encodings vary "
            f"more than the source's hurts: variance-raising designs belong on the source, lowering ones on the target")


def watch_variance(records, source, target, probe, device, args, step, steps_per_epoch, epoch_time=None, redo_until=0):
    """Run the variance monitor, log its record with its time and this epoch's training time (its
    cost), append it to `records`, and warn once v_target > v_source at two evaluations in a row."""
    start = time.time()
    record = {"epoch": step / steps_per_epoch, "step": step, **asymmetry_variance(source, target, probe, device, args),
              "variance_time": time.time() - start}
    if epoch_time is not None:
        record["epoch_time"] = epoch_time
    log(args, record, redo_until)
    records.append(record)
    warning = variance_warning(records)
    if warning:
        augment.warn(warning)


def log(args, stats, redo_until=0):
    """Print and append to output-dir/log.jsonl (rank 0). Steps up to redo_until were logged before an
    interruption and run again after the resume: their records say "redo": true."""
    if rank() == 0:
        stats = {**stats, "redo": True} if 0 < stats.get("step", 0) <= redo_until and "resumed" not in stats else stats
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()), flush=True)
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(stats) + "\n")


def last_logged_step(args):
    """The highest step in output-dir/log.jsonl (0 if none)."""
    try:
        with open(os.path.join(args.output_dir, "log.jsonl")) as f:
            return max([json.loads(line).get("step", 0) for line in f if line.strip()], default=0)
    except (OSError, ValueError):
        return 0


# ---- one run over many processes: stop together, fail together, with one clear line ---------------
EXIT_STOPPED = 3  # the exit code after a stop signal: the checkpoint is saved; the same command continues


class Stopped(Exception):
    """A stop signal reached a process; every process saved and stopped."""


class RunFailed(Exception):
    """Some process failed; raised on every process. failures: {rank: (exit code, message)}."""

    def __init__(self, failures):
        super().__init__("; ".join(message for _, message in failures.values()))
        self.failures = failures


def one_line(e):
    """An exception as one line: its message's last line (a data worker's error arrives with its traceback)."""
    return (str(e).strip() or type(e).__name__).splitlines()[-1].split("InputError: ")[-1]


def lost_contact(e):
    """Whether a collective's error says another process is gone or hung (gloo's words; NCCL aborts instead)."""
    return any(words in str(e) for words in ("Timed out", "timed out", "Connection closed", "pair closure", "Connection reset"))


def agree(stop, failure, control):
    """Every process's news at this point of the loop, in one small all-reduce on the CPU (the control
    group, gloo): -> True on every process if any was asked to stop; if any failed (failure: its
    exception), RunFailed on every process, with each failed process's message. (A process that is
    gone or hung makes the collective fail after --dist-timeout: see main.)"""
    status = torch.tensor([2 if failure is not None else 1 if stop else 0])
    mine = None if failure is None else (2 if isinstance(failure, augment.InputError) else 1, one_line(failure))
    failures = [mine]
    if world_size() > 1:
        dist.all_reduce(status, op=dist.ReduceOp.MAX, group=control)
        if status.item() == 2:
            failures = [None] * world_size()
            dist.all_gather_object(failures, mine, group=control)
    if status.item() < 2:
        return bool(status.item())
    raise RunFailed({r: f for r, f in enumerate(failures) if f is not None})


def control_group():
    """The process group of the loop's agreements: gloo, so they never wait for the GPU."""
    if world_size() == 1:
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def guarded(loader):
    """The loader's (batch, labels) as ((batch, labels), None); if loading fails (a corrupt image),
    ((None, None), the exception) once, so that the failure can be agreed on with the other processes
    instead of hanging them."""
    batches = iter(loader)
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except Exception as e:
            yield (None, None), e
            return
        yield item, None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """While active: SIGTERM, SIGUSR1 and SIGINT (a scheduler's warning before it kills a job, or ^C)
    ask the loop to save and stop after the current step; a second one acts as usual. A process whose
    launcher died (SIGUSR1 kills torchrun's agent) is asked too, instead of training on as an orphan."""

    def __enter__(self):
        self.received, self.parent = None, os.getppid()
        self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def pending(self):
        if self.received is None and "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() != self.parent:
            self.received = "the launcher's exit"
        return self.received

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id):
    """Data workers leave the stop signals to the training process, which stops them when it is done."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def divergence(loss_value, step, args):
    """-> FloatingPointError if the loss is NaN or infinite, else None (each save checks the whole state)."""
    if math.isfinite(loss_value):
        return None
    return FloatingPointError(f"training diverged at step {step} (loss {loss_value}); {on_disk(args)}")


def check_args(args, train_set):
    """Impossible settings as one clear error, before any work."""
    world, local = world_size(), args.batch_size // world_size()
    problems = []
    if args.arch not in RESNETS:
        problems.append(f"--arch {args.arch} is not a torchvision ResNet ({', '.join(RESNETS)})")
    if args.batch_size % world:
        problems.append(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    elif args.bn_splits < 1 or local % args.bn_splits or local // args.bn_splits < 2:
        problems.append(f"the per-process batch {local} must split into --bn-splits {args.bn_splits} groups of 2 or more")
    if len(train_set) < args.batch_size:
        problems.append(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    if args.syncbn_group_size and world % args.syncbn_group_size:
        problems.append(f"--syncbn-group-size {args.syncbn_group_size} does not divide the {world} processes")
    if args.mean_enc < 1 or args.mean_enc_source < 1 or args.multicrop < 0:
        problems.append("--mean-enc, --mean-enc-source and --multicrop must be positive")
    if args.image_size < 16:
        problems.append(f"--image-size {args.image_size} is too small: 16 or more (MultiCrop's crops are smaller still)")
    if args.epochs < 1 or args.batch_size < 1:
        problems.append("--epochs and --batch-size must be 1 or more")
    if args.lr < 0 or args.wd < 0:
        problems.append("--lr and --wd must not be negative")
    if args.save_every < 0 or args.dist_timeout <= 0 or args.print_freq < 1:
        problems.append("--save-every must not be negative, --dist-timeout and --print-freq must be positive")
    if args.variance_every >= 0 and (args.variance_views < 2 or args.variance_images < 1):
        problems.append("--variance-views must be 2 or more (a variance over views) and --variance-images 1 or more")
    if problems:
        raise augment.InputError("; ".join(problems))


def init_distributed(args):
    """torchrun (env://): one process per GPU (NCCL) or per CPU share (gloo); -> this process's device."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=args.dist_timeout)
        if torch.cuda.is_available():  # one GPU per process, named so NCCL need not guess it
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resume_path(args):
    """The checkpoint to continue from: the output directory's own if there is one (a requeued command
    continues where it stopped, whatever --resume names), else --resume PATH; None to start afresh."""
    own = os.path.join(args.output_dir, "checkpoint.pth")
    if args.resume == "none":
        if os.path.exists(own):
            raise augment.InputError(f"--resume none, but {own} exists: remove it or choose another --output-dir")
        return None
    if os.path.exists(own):
        return own
    if args.resume != "auto" and not os.path.exists(args.resume):
        raise augment.InputError(f"--resume {args.resume}: no such file")
    return None if args.resume == "auto" else args.resume


def train(args):
    device = init_distributed(args)
    control = control_group()
    if args.amp == "auto":
        args.amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    torch.backends.cudnn.benchmark = True

    # Inputs, output directory and checkpoint are checked on every process before any work; a problem
    # on any of them stops all of them with its message (agree), instead of hanging the others.
    lock, failure = None, None
    try:
        train_set, bank_set, test_set = make_datasets(args)
        check_args(args, train_set)
        lock = lock_output_dir(args)
    except augment.InputError as e:
        failure = e
    agree(False, failure, control)
    try:
        if args.skip_bad_images or not args.no_image_check:  # an unreadable image stops the run now, not hours in
            for what, images in (("training images", train_set), ("kNN bank images", bank_set), ("kNN test images", test_set)):
                augment.check_images(images, args.skip_bad_images, args.workers, control, what)
        if args.data_on_device:  # decoded into the device's memory now, so that bad settings stop before any work
            train_set = augment.OnDevice(train_set, args.workers)
        steps_per_epoch = len(train_set) // args.batch_size
        resume = resume_path(args)
        ckpt = read_checkpoint(resume, args, steps_per_epoch) if resume else None
        probe = augment.Replay(probe_loader(test_set.base, args)) if args.variance_every >= 0 else None  # after the image check
    except augment.InputError as e:
        failure = e
    agree(False, failure, control)
    source, target = build_encoders(args, device)
    optimizer = make_optimizer(source, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    state = {"source": source, "target": target, "optimizer": optimizer, "scaler": scaler}
    step = 0
    try:
        check_room(args, state)
        step = restore(ckpt, resume, state) if ckpt else 0
    except augment.InputError as e:
        failure = e
    agree(False, failure, control)
    source_ddp = nn.parallel.DistributedDataParallel(source) if world_size() > 1 else source
    source_forward, target_forward = source_ddp, target
    if args.compile:  # compiled forwards; the weights, optimizer and checkpoints stay those of source and target
        source_forward, target_forward = (torch.compile(m, backend=args.compile) for m in (source_ddp, target))
    total_steps = args.epochs * steps_per_epoch
    peak_lr = args.lr * args.batch_size / 256
    saved_step, redo_until = step, last_logged_step(args) if step else 0
    if step:
        log(args, {"resumed": resume, "step": step, "redo_until": redo_until})
    bank_loader, test_loader = eval_loader(bank_set, args), eval_loader(test_set, args)
    last_step = min(total_steps, args.max_steps or total_steps)

    variance_records = []  # the variance monitor's, for its warning
    with StopSignals() as signals:
        if step == 0 and args.knn_every > 0:  # the initial encoder's accuracy: the reference to beat
            log(args, {"epoch": 0.0, "step": 0, "knn_top1": knn_accuracy(source.backbone, bank_loader, test_loader, device, args)})
        if step == 0 and args.variance_every > 0:  # the initial encoder's variance of each side
            watch_variance(variance_records, source, target, probe, device, args, 0, steps_per_epoch)
        while step < last_step:
            window_start, window_steps, data_time = time.time(), 0, 0.0
            epoch_start = tick = time.time()
            for (batch, _), failure in guarded(train_loader(train_set, step // steps_per_epoch, step % steps_per_epoch, args)):
                if agree(signals.pending(), failure, control):  # a stop signal reached some process
                    if step != saved_step:
                        save_checkpoint(args, step, steps_per_epoch, state, control)
                    raise Stopped(f"{signals.pending() or 'a signal to another process'} at step {step}: {on_disk(args)}; "
                                  f"the same command continues from there")
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
                ema = target_momentum(step, total_steps, args.ema)
                momentum_update(target, source, ema)
                step += 1
                window_steps += 1
                if step % args.print_freq == 0 or step == last_step or step % steps_per_epoch == 0:
                    loss_value = loss.item()  # also waits for the GPU, so the window's times are real
                    agree(False, divergence(loss_value, step, args), control)
                    elapsed = time.time() - window_start
                    log(args, {"epoch": step / steps_per_epoch, "step": step, "loss": loss_value, "lr": lr,
                               "ema": ema, "data_time": data_time / window_steps,
                               "step_time": elapsed / window_steps, "images_per_s": args.batch_size * window_steps / elapsed,
                               "std_source": simsiam_std(p), "std_target": simsiam_std(z)}, redo_until)
                    window_start, window_steps, data_time = time.time(), 0, 0.0
                if step == last_step or step % steps_per_epoch == 0:
                    break
                if args.save_every and step % args.save_every == 0:
                    saved_step = save_checkpoint(args, step, steps_per_epoch, state, control)
                tick = time.time()
            epoch_time = time.time() - epoch_start  # this epoch's training (what the variance monitor's time is set against)
            saved_step = save_checkpoint(args, step, steps_per_epoch, state, control)
            done = step == last_step
            if args.knn_every >= 0 and (done or (args.knn_every and step % (args.knn_every * steps_per_epoch) == 0)):
                log(args, {"epoch": step / steps_per_epoch, "step": step,
                           "knn_top1": knn_accuracy(source.backbone, bank_loader, test_loader, device, args)}, redo_until)
            if args.variance_every >= 0 and (done or (args.variance_every and step % (args.variance_every * steps_per_epoch) == 0)):
                watch_variance(variance_records, source, target, probe, device, args, step, steps_per_epoch, epoch_time, redo_until)
    if lock:
        lock.close()
    if dist.is_initialized():
        dist.barrier()  # rank 0 hosts the rendezvous store: nobody leaves before all are done


# =============================================================================================
# Main
# =============================================================================================
def main(argv=None):
    run(train, parse_args(argv))


def run(train, args):
    """train(args), ended the same way on every process: a stop signal (exit 3, the checkpoint saved),
    a failure on any process (one line per message, exit 1 or 2: bad input), a lost process (exit 1)."""
    code = 0
    try:
        train(args)
    except Stopped as e:
        if rank() == 0:
            print(f"stopped by {e}", file=sys.stderr, flush=True)
        code = EXIT_STOPPED
    except RunFailed as e:  # every process has it; rank 0 prints each message once, with the ranks that had it
        by_message = {}
        for r, (exit_code, message) in sorted(e.failures.items()):
            by_message.setdefault(message, []).append(r)
        if rank() == 0:
            for message, ranks in by_message.items():
                where = "" if world_size() == 1 or len(ranks) == world_size() else f" (rank {', '.join(map(str, ranks))})"
                print(f"error{where}: {message}", file=sys.stderr, flush=True)
        code = max(exit_code for exit_code, _ in e.failures.values())
    except RuntimeError as e:  # a collective gave up: another process died or hung past --dist-timeout
        if not (dist.is_initialized() and lost_contact(e)):
            raise
        print(f"error (rank {rank()}): lost contact with the other processes ({one_line(e)})", file=sys.stderr, flush=True)
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
