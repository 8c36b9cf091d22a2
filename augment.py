"""The views of the six *_asym.py scripts, from an image on disk to a batch, and their plumbing.

The paper (Wang et al., CVPR 2022) puts designs that raise the variance of the encodings on the
gradient-updated *source* encoder (MultiCrop, ScaleMix, StrongerAug), those that lower it on the
no-gradient *target* (WeakerAug, MeanEnc; AsymBN lives in the model). This file builds the views:

    views = Views(size=32, source_aug="stronger", target_aug="weaker", multicrop=6, ...)
    train_set = dataset("synthetic", "train", views)
    loader = DataLoader(train_set, batch_size=64, collate_fn=collate_views)
    batch, labels = next(iter(loader))  # batch["source"]: (n_s*B)x3xHxW, view-major

Recipes: torchvision.transforms.v2 pipelines on uint8 tensors (one decode per image); --gpu-aug
(device_aug=True) colours the batch on the device in finish_views (else the identity)."""
import argparse
import contextlib
import datetime
import functools
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---- Recipes: one augmentation pipeline per view -------------------------------------------------
# name -> (RandomResizedCrop min scale, ColorJitter strengths, blur p, solarize p)
RECIPES = {
    "mocov2": (0.2, (0.4, 0.4, 0.4, 0.1), 0.5, 0.0),
    "byol1": (0.08, (0.4, 0.4, 0.2, 0.1), 1.0, 0.0),  # BYOL's view 1
    "byol2": (0.08, (0.4, 0.4, 0.2, 0.1), 0.1, 0.2),  # BYOL's view 2
    "simclr": (0.08, (0.8, 0.8, 0.8, 0.2), 0.5, 0.0),
}
# Each framework's default view pair: (source recipe, target recipe).
FRAMEWORK_RECIPES = {"mocov2": ("mocov2", "mocov2"), "simsiam": ("mocov2", "mocov2"),
                     "byol": ("byol1", "byol2"), "mocov3": ("byol1", "byol2"),
                     "barlow": ("byol1", "byol2"), "simclr": ("simclr", "simclr")}
# Every RandomResizedCrop of a framework (standard, MultiCrop, WeakerAug, --gpu-aug) resamples as
# its paper: bicubic in BYOL and Barlow Twins, bilinear (torchvision's default) in the others.
FRAMEWORK_INTERPOLATION = {"mocov2": "bilinear", "simsiam": "bilinear", "mocov3": "bilinear",
                           "simclr": "bilinear", "byol": "bicubic", "barlow": "bicubic"}
JITTER_P, GRAY_P = 0.8, 0.2  # every recipe: ColorJitter applied with p 0.8, grayscale with p 0.2
MULTICROP_SCALE = (0.05, 0.14)  # small crops; the standard crops then start at 0.14
MULTICROP_SIZE_AT_224 = 96


def small_crop_size(size):
    """MultiCrop crop size: 96 px at 224, scaled and rounded to a multiple of 8 (16 px at 32)."""
    return max(8, 8 * round(size * MULTICROP_SIZE_AT_224 / 224 / 8))


def blur_kernel(size):
    """Odd blur kernel, ~10% of the image (23 px at 224); none below 64 px (small-data recipes)."""
    return 0 if size < 64 else int(0.1 * size) // 2 * 2 + 1


class GaussianBlur(torch.nn.Module):
    """PIL's blur of uint8 3xHxW, sigma ~ U(0.1, 2) px, as MoCo v2 / SimSiam: several times faster
    on CPU than torchvision's 23-tap tensor blur, a grey level off at most (benchmarks/, tests/)."""

    def __init__(self, sigma=(0.1, 2.0)):
        super().__init__()
        self.sigma = sigma

    def forward(self, image):
        sigma = torch.empty(1).uniform_(*self.sigma).item()  # the torch RNG: seeded per sample
        blurred = Image.fromarray(image.permute(1, 2, 0).numpy()).filter(
            ImageFilter.GaussianBlur(sigma))
        return torch.from_numpy(np.array(blurred)).permute(2, 0, 1)


# ---- StrongerAug's RandAugment -------------------------------------------------------------------
# The official code's timm rand_augment_transform("rand-m10-n2-mstd0.5").
# Two ops, magnitude m ~ N(10, 0.5), level m / 10 (m10: timm's maximum, not a third of
# torchvision's range). Each op is PIL's (as timm calls it) to the bit: invert, posterize, solarize,
# equalize, brightness, sharpness are torchvision's v2 ops; colour, contrast, autocontrast follow
# PIL's rounding (torchvision's are a grey level off on up to half the pixels); geometric ops call
# PIL. Draws: the torch RNG (seeded per sample), in timm's order: ops, p, magnitude, sign, resample.
RA_FILL = 128  # timm's grey fill (128, 128, 128) for the geometric ops


def pil_grayscale(x):
    """uint8 3xHxW -> int32 1xHxW luma as PIL's convert("L") (ITU-R 601-2, fixed point, rounded)."""
    r, g, b = x.int().unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(-3)


def pil_blend(degenerate, image, factor):
    """PIL's Image.blend(degenerate, image, factor), which ImageEnhance uses: degenerate +
    factor (image - degenerate) in float32, clipped to [0, 255] and truncated."""
    degenerate = degenerate.float()
    return (degenerate + factor * (image.float() - degenerate)).clamp(0, 255).to(torch.uint8)


def pil_color(x, factor):
    """ImageEnhance.Color: blend with the image's grey version (PIL's luma, not torchvision's)."""
    return pil_blend(pil_grayscale(x), x, factor)


def pil_contrast(x, factor):
    """ImageEnhance.Contrast: blend with a flat image at the mean luma, rounded to an integer."""
    mean = int(pil_grayscale(x).double().mean().item() + 0.5)
    return pil_blend(torch.full_like(x, mean), x, factor)


def pil_autocontrast(x):
    """ImageOps.autocontrast: channel [lo, hi] -> [0, 255] by int(i * scale + -lo * scale), scale =
    255 / (hi - lo), in float64 as PIL (torch's scalar / tensor is an ulp off); flat ones kept."""
    tables = []
    for lo, hi in zip(x.amin((-2, -1)).tolist(), x.amax((-2, -1)).tolist()):
        if hi <= lo:
            tables.append(torch.arange(256, dtype=torch.float64))
            continue
        scale = 255.0 / (hi - lo)
        tables.append((torch.arange(256, dtype=torch.float64) * scale + -lo * scale).trunc()
                      .clamp(0, 255))
    return torch.stack(tables).to(torch.uint8).gather(1, x.flatten(-2).long()).view_as(x)


def solarize_add(x, addition, threshold=128):
    """timm's solarize_add: pixels below the threshold get `addition` more, clipped to 255."""
    return torch.where(x < threshold, (x.int() + addition).clamp(max=255).to(torch.uint8), x)


PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def pil_geometric(x, transform):
    """uint8 3xHxW -> transform(PIL image) -> uint8, as timm; torchvision's affine differs (fill
    blended into the border, bicubic a = -0.75, not -1, rounding); PIL: exact, 4x faster."""
    image = transform(Image.fromarray(x.permute(1, 2, 0).numpy()))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def pil_affine(x, matrix, resample, fill=RA_FILL):
    """PIL's Image.transform(size, AFFINE, matrix, resample, fillcolor=grey): pixel (x, y) (edge
    coordinates) samples (a x + b y + c, d x + e y + f): a shear turns about the top-left corner."""
    return pil_geometric(x, lambda image: image.transform(
        image.size, Image.AFFINE, matrix, PIL_RESAMPLE[resample], fillcolor=(fill,) * 3))


def pil_rotate(x, degrees, resample, fill=RA_FILL):
    """PIL's Image.rotate(degrees, resample, fillcolor=grey): counter-clockwise about the centre."""
    return pil_geometric(x, lambda image: image.rotate(degrees, resample=PIL_RESAMPLE[resample],
                                                       fillcolor=(fill,) * 3))


# name -> (level l in [0, 1] -> argument, whether the argument's sign flips with p 0.5), as timm's
# _*_level_to_arg for "rand-" (Posterize: timm's "Posterize", not "PosterizeOriginal")
RA_ARGUMENTS = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": (lambda level: level * 30.0, True),  # degrees
    "Posterize": (lambda level: int(level * 4), False),  # bits kept
    "Solarize": (lambda level: min(256, int(level * 256)), False),  # threshold (256: none inverted)
    "SolarizeAdd": (lambda level: min(128, int(level * 110)), False),  # added below 128
    "Color": (lambda level: level * 1.8 + 0.1, False),  # enhance factors: 1.0 is the identity
    "Contrast": (lambda level: level * 1.8 + 0.1, False),
    "Brightness": (lambda level: level * 1.8 + 0.1, False),
    "Sharpness": (lambda level: level * 1.8 + 0.1, False),
    "ShearX": (lambda level: level * 0.3, True),  # shear factor
    "ShearY": (lambda level: level * 0.3, True),
    "TranslateXRel": (lambda level: level * 0.45, True),  # fraction of the width
    "TranslateYRel": (lambda level: level * 0.45, True),  # fraction of the height
}
RA_OPS = tuple(RA_ARGUMENTS)
RA_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def ra_apply(x, name, argument=None, resample="bilinear"):
    """One RandAugment op with its argument (RA_ARGUMENTS) on uint8 3xHxW, as timm calls PIL."""
    height, width = x.shape[-2:]
    if name in ("AutoContrast", "Equalize", "Invert"):
        return {"AutoContrast": pil_autocontrast, "Equalize": v2.functional.equalize,
                "Invert": v2.functional.invert}[name](x)
    if name == "Solarize":  # inverts the pixels >= threshold: none at 256
        return x if argument > 255 else v2.functional.solarize(x, argument)
    if name == "Rotate":
        return pil_rotate(x, argument, resample)
    if name in RA_GEOMETRIC:  # shears and translations
        matrix = {"ShearX": (1, argument, 0, 0, 1, 0), "ShearY": (1, 0, 0, argument, 1, 0),
                  "TranslateXRel": (1, 0, argument * width, 0, 1, 0),
                  "TranslateYRel": (1, 0, 0, 0, 1, argument * height)}[name]
        return pil_affine(x, matrix, resample)
    # Posterize: 0 bits (level < 0.25: m 15 standard deviations below 10) give black; Sharpness:
    # PIL's SMOOTH kernel, border pixels kept
    return {"Posterize": v2.functional.posterize, "SolarizeAdd": solarize_add, "Color": pil_color,
            "Contrast": pil_contrast, "Brightness": v2.functional.adjust_brightness,
            "Sharpness": v2.functional.adjust_sharpness}[name](x, argument)


class RandAugment(torch.nn.Module):
    """timm's RandAugment (StrongerAug): num_ops ops drawn uniformly with replacement from RA_OPS,
    each applied with probability p at magnitude m ~ N(magnitude, magnitude_std) clipped to [0, 10];
    geometric ops fill grey 128 and resample bilinear or bicubic at random. About 30% of the images
    pass unchanged (each op is skipped with p 0.5; Solarize at m 10 inverts nothing)."""

    def __init__(self, num_ops=2, magnitude=10.0, magnitude_std=0.5, p=0.5):
        super().__init__()
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.p = p

    def draw(self):
        """The random part: [(op name, argument, resampling)] of the ops applied to one image."""
        calls = []
        for index in torch.randint(len(RA_OPS), (self.num_ops,)).tolist():
            if torch.rand(()).item() > self.p:  # timm: random() > prob -> skipped
                continue
            name, argument, resample = RA_OPS[index], None, None
            m = min(max(self.magnitude + self.magnitude_std * torch.randn(()).item(), 0.0), 10.0)
            if RA_ARGUMENTS[name] is not None:
                to_argument, signed = RA_ARGUMENTS[name]
                argument = to_argument(m / 10.0)
                if signed and torch.rand(()).item() > 0.5:  # timm's _randomly_negate
                    argument = -argument
            if name in RA_GEOMETRIC:
                resample = ("bilinear", "bicubic")[int(torch.randint(2, ()).item())]
            calls.append((name, argument, resample))
        return calls

    def forward(self, image):
        for name, argument, resample in self.draw():
            image = ra_apply(image, name, argument, resample)
        return image


def random_resized_crop(size, scale, interpolation):
    """RandomResizedCrop resampling "bilinear" or "bicubic" (antialiased when shrinking)."""
    return v2.RandomResizedCrop(size, scale=scale,
                                interpolation=v2.InterpolationMode(interpolation), antialias=True)


def view_transform(recipe, size, scale=None, randaugment=False, device_aug=False,
                   interpolation="bilinear"):
    """One view of a uint8 CxHxW image -> normalised float CxSxS. recipe: a RECIPES name or "weaker"
    (WeakerAug: RandomResizedCrop(0.08, 1) + flip). randaugment: StrongerAug = the recipe +
    RandAugment after the flip. scale: overrides the recipe's crop scales (MultiCrop: (0.14, 1),
    (0.05, 0.14)). device_aug (--gpu-aug): -> (uint8 CxSxS, parameters) for finish_views
    (DeviceAugView). interpolation: the crop's resampling (FRAMEWORK_INTERPOLATION)."""
    if device_aug and not randaugment and recipe != "weaker":
        return DeviceAugView(recipe, size, scale, interpolation)
    if recipe == "weaker":
        scale = scale or (0.08, 1.0)
        ops = [random_resized_crop(size, scale, interpolation), v2.RandomHorizontalFlip()]
    else:
        default_min, jitter, blur_p, solarize_p = RECIPES[recipe]
        scale = scale or (default_min, 1.0)
        ops = [random_resized_crop(size, scale, interpolation),
               v2.RandomApply([v2.ColorJitter(*jitter)], p=JITTER_P), v2.RandomGrayscale(p=GRAY_P)]
        if blur_kernel(size) and blur_p > 0:
            ops.append(v2.RandomApply([GaussianBlur(sigma=(0.1, 2.0))], p=blur_p))
        if solarize_p > 0:
            ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        ops.append(v2.RandomHorizontalFlip())
    if randaugment:
        ops.append(RandAugment())
    if device_aug:  # nothing left for the device but float conversion and normalisation
        return FinishedOnWorker(v2.Compose(ops))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


def eval_transform(size):
    """Center view (kNN, probes): resize to size/0.875 (256 -> 224; <= 64 px: size), center-crop."""
    resize = size if size <= 64 else round(size * 256 / 224)
    return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ---- ScaleMix (source): mix two views of one image by a box of random scale ----------------------
# +-----------------------------------------------------------------------------------------+
# | ScaleMix raises the source's variance: a box of the second view, of random size and     |
# | position, pastes a differently scaled crop into the first. It yields one standard-size |
# | view and, unlike CutMix, mixes no labels (there are none).                              |
# +-----------------------------------------------------------------------------------------+
def scalemix_box(height, width, lam, center_y, center_x):
    """Box (top, bottom, left, right) of sides sqrt(1-lam)*(H, W) about (center_y, center_x),
    clipped; heights go with rows, widths with columns (the official code swaps them)."""
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    top, bottom = max(center_y - half_h, 0), min(center_y + half_h, height)
    left, right = max(center_x - half_w, 0), min(center_x + half_w, width)
    return top, bottom, left, right


def random_scalemix_box(height, width):
    """scalemix_box with lam ~ U(0,1) and a uniform centre."""
    lam = torch.rand(()).item()
    center_y, center_x = torch.randint(height, ()).item(), torch.randint(width, ()).item()
    return scalemix_box(height, width, lam, center_y, center_x)


def scalemix(x1, x2):
    """x1, x2: CxHxW views of one image -> x1 with a random box (lam ~ U(0,1)) taken from x2."""
    top, bottom, left, right = random_scalemix_box(*x1.shape[-2:])
    mixed = x1.clone()
    mixed[:, top:bottom, left:right] = x2[:, top:bottom, left:right]
    return mixed


# ---- --gpu-aug: the photometric half of each view, batched on the device -------------------------
# A view is geometry (crop, flip: needs the decoded image), then colour (per pixel or local, so it
# commutes with the flip). A worker does the geometry and draws every parameter as the CPU recipe
# does; finish_views colours the device batch. Views, seeds, statistics: the CPU path's; pixels
# differ by its uint8 rounding after each op and the blur (13 taps: 3 sigma at 2; not PIL's boxes).
# StrongerAug's RandAugment (after the colour, on uint8) stays on the worker.
PARAMS = ("jitter", "brightness", "contrast", "saturation", "hue",
          "order0", "order1", "order2", "order3", "gray", "sigma", "solarize")
IDENTITY_PARAMS = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0)
BLUR_TAPS = 13


class DeviceAugView:
    """A worker's half of a recipe view: uint8 image -> (cropped, flipped uint8 CxSxS, float
    PARAMS), with view_transform's draws in order and number (RandomApply: torch.rand(1) < p)."""

    def __init__(self, recipe, size, scale=None, interpolation="bilinear"):
        default_min, jitter, self.blur_p, self.solarize_p = RECIPES[recipe]
        self.crop = random_resized_crop(size, scale or (default_min, 1.0), interpolation)
        self.jitter = v2.ColorJitter(*jitter)
        self.blur_p = self.blur_p if blur_kernel(size) else 0.0  # as view_transform: none < 64 px
        self.flip = v2.RandomHorizontalFlip()

    def __call__(self, image):
        view = self.crop(image)
        p = dict(zip(PARAMS, IDENTITY_PARAMS))
        if torch.rand(1) < JITTER_P:
            jitter = self.jitter.make_params([])
            p.update({name: jitter[name + "_factor"] for name in PARAMS[1:5]  # brightness..hue
                      if jitter[name + "_factor"] is not None}, jitter=1.0)  # None: the identity
            p.update({f"order{i}": float(op) for i, op in enumerate(jitter["fn_idx"])})
        p["gray"] = float(torch.rand(1) < GRAY_P)
        if self.blur_p > 0 and torch.rand(1) < self.blur_p:
            p["sigma"] = torch.empty(1).uniform_(0.1, 2.0).item()  # GaussianBlur's draw
        if self.solarize_p > 0:
            p["solarize"] = float(torch.rand(1) < self.solarize_p)
        return self.flip(view), torch.tensor([p[name] for name in PARAMS])


class FinishedOnWorker:
    """A view the worker finishes (WeakerAug, StrongerAug) -> (uint8 view, identity parameters)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), torch.tensor(IDENTITY_PARAMS)


def grayscale(x):
    """Nx3xHxW -> Nx1xHxW luma (ITU-R 601-2, as torchvision)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(x, y, ratio):
    """ratio x + (1 - ratio) y, clamped to [0, 1]; ratio: one factor per image (N)."""
    ratio = ratio.view(-1, 1, 1, 1)
    return (ratio * x + (1 - ratio) * y).clamp(0, 1)


def adjust_hue(x, shift):
    """Turn each image's hue by its shift (N, a fraction of the colour circle) through HSV."""
    r, g, b = x.unbind(1)
    value, low = x.amax(1), x.amin(1)
    chroma = value - low
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), 0.0)
    c = chroma.clamp(min=1e-12)
    hue = torch.where(value == r, (g - b) / c,
                      torch.where(value == g, 2 + (b - r) / c, 4 + (r - g) / c))
    hue = (torch.where(chroma > 0, hue, 0.0) / 6 + shift.view(-1, 1, 1)) % 1.0
    # to RGB: value - value saturation clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) % 6, n = 5, 3, 1
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # no host copy
    k = (n + 6 * hue.unsqueeze(1)) % 6
    return value.unsqueeze(1) - ((value * saturation).unsqueeze(1)
                                 * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x, sigma):
    """Nx3xHxW, sigma N -> each image blurred by its own separable BLUR_TAPS-tap Gaussian (reflect
    padding, as torchvision's gaussian_blur), one grouped convolution per axis for the batch."""
    n, c, h, w = x.shape
    t = torch.arange(BLUR_TAPS, device=x.device, dtype=x.dtype) - BLUR_TAPS // 2
    kernel = torch.exp(-0.5 * (t / sigma.clamp(min=1e-6).unsqueeze(1)) ** 2)  # N x taps
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C) x taps
    y = F.pad(x.reshape(1, n * c, h, w), [BLUR_TAPS // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, BLUR_TAPS), groups=n * c)  # along rows
    y = F.conv2d(y, kernel.view(n * c, 1, BLUR_TAPS, 1), groups=n * c)  # along columns
    return y.view(n, c, h, w)


def photometric(x, params):
    """Nx3xHxW in [0, 1], NxP PARAMS -> ColorJitter (each image's op order), RandomGrayscale,
    GaussianBlur, RandomSolarize, batched, kept where drawn (torch.where): no host-device sync."""
    p = dict(zip(PARAMS, params.to(x.dtype).unbind(1)))
    selected = {name: (p[name] > 0).view(-1, 1, 1, 1)
                for name in ("jitter", "gray", "sigma", "solarize")}
    operations = (lambda x: blend(x, 0.0, p["brightness"]),
                  lambda x: blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), p["contrast"]),
                  lambda x: blend(x, grayscale(x), p["saturation"]),
                  lambda x: adjust_hue(x, p["hue"]))
    for position in range(4):
        for op, operation in enumerate(operations):
            chosen = selected["jitter"] & (p[f"order{position}"] == op).view(-1, 1, 1, 1)
            x = torch.where(chosen, operation(x), x)
    x = torch.where(selected["gray"], grayscale(x).expand_as(x), x)
    if blur_kernel(x.shape[-1]):  # the recipes blur views of 64 px or more
        x = torch.where(selected["sigma"], gaussian_blur(x, p["sigma"]), x)
    return torch.where(selected["solarize"] & (x >= 128 / 255), 1 - x, x)


def paste_boxes(x1, x2, boxes):
    """Batched scalemix: NxCxHxW x1, x2, N boxes (top, bottom, left, right) -> x1, boxes from x2."""
    rows = torch.arange(x1.shape[-2], device=x1.device).view(1, -1, 1)
    cols = torch.arange(x1.shape[-1], device=x1.device).view(1, 1, -1)
    top, bottom, left, right = (b.view(-1, 1, 1) for b in boxes.unbind(1))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return torch.where(inside.unsqueeze(1), x2, x1)


@functools.lru_cache(maxsize=None)
def imagenet_mean_std(device):
    """1x3x1x1 ImageNet mean, std on `device`, made once: a copy per step would wait for the GPU."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def finish_views(batch):
    """The device's half of --gpu-aug: uint8 views -> photometric (the workers' parameters), float,
    ImageNet normalisation, ScaleMix's boxes. Float views (no --gpu-aug) pass unchanged."""
    finished = {}
    for kind, x in batch.items():
        if kind.endswith(("_params", "_box")):
            continue
        if x.dtype == torch.uint8:
            x = photometric(x.float() * (1 / 255), batch[kind + "_params"])
            mean, std = imagenet_mean_std(x.device)
            x = (x - mean) / std
            if kind + "_box" in batch:  # ScaleMix views: the first halves get boxes of the second
                x = paste_boxes(*x.chunk(2), batch[kind + "_box"])
        finished[kind] = x
    return finished


# ---- Views: the source views and the target views of one image -----------------------------------
class Views:
    """Image -> {"source": n_s x 3xSxS, "target": n_t x 3xSxS, and where MultiCrop is,
    "source_small" / "target_small": m x 3xsxs}. framework: the "default" recipe pair
    (FRAMEWORK_RECIPES), the crops' interpolation. source_aug / target_aug: "weaker" | "default" |
    "stronger" (AsymAug = stronger/weaker). n_source / n_target: standard views per encoder (MeanEnc
    averages the n_t target encodings). multicrop: m small crops on multicrop_on ("source" |
    "target" | "both"), of the default recipe whatever the aug; standard crops (not WeakerAug's)
    then start at 0.14. scalemix_on: None | "source" | "target" | "both": those standard views are
    ScaleMix views. crop_min: the standard crops' min scale if not the recipe's (MoCo v3's ResNet:
    0.2). device_aug (--gpu-aug): views stay uint8 before the colour; kind k comes with "k_params"
    (PARAMS) and, for ScaleMix, both views of each pair and "k_box", for finish_views."""

    def __init__(self, size, framework="mocov2", source_aug="default", target_aug="default",
                 n_source=1, n_target=1, multicrop=0, multicrop_on="source", scalemix_on=None,
                 crop_min=None, device_aug=False):
        self.n_source, self.n_target, self.scalemix_on = n_source, n_target, scalemix_on
        self.multicrop, self.multicrop_on, self.device_aug = multicrop, multicrop_on, device_aug
        self.interpolation = FRAMEWORK_INTERPOLATION[framework]
        self.recipes = {}  # kind -> (recipe, size, crop scale (None: the recipe's), StrongerAug)
        for encoder, aug, default in zip(("source", "target"), (source_aug, target_aug),
                                         FRAMEWORK_RECIPES[framework]):
            recipe = "weaker" if aug == "weaker" else default
            standard_scale = None  # the recipe's; WeakerAug keeps (0.08, 1), MultiCrop or not
            if recipe != "weaker" and (multicrop or crop_min):  # MultiCrop: small crops get <0.14
                standard_scale = (MULTICROP_SCALE[1] if multicrop else crop_min, 1.0)
            self.recipes[encoder] = (recipe, size, standard_scale, aug == "stronger")
            # small crops: the default recipe (the official augmentation_mini) whatever the aug
            self.recipes[encoder + "_small"] = (default, small_crop_size(size),
                                                MULTICROP_SCALE, False)
        self.transforms = {kind: view_transform(*recipe, device_aug, self.interpolation)
                           for kind, recipe in self.recipes.items()}

    def counts(self):
        """kind -> views of that kind per image."""
        counts = {"source": self.n_source, "target": self.n_target}
        counts.update({encoder + "_small": self.multicrop for encoder in ("source", "target")
                       if self.multicrop and self.multicrop_on in (encoder, "both")})
        return counts

    def _views(self, kind, image, n):
        """n views of one kind -> {kind: n x 3xSxS} (device_aug: also kind + "_params": n x P)."""
        t = self.transforms[kind]
        mix = kind in ("source", "target") and self.scalemix_on in (kind, "both")
        if not self.device_aug:
            return {kind: torch.stack([scalemix(t(image), t(image)) if mix else t(image)
                                       for _ in range(n)])}
        views, params, boxes = [[], []], [[], []], []
        for _ in range(n):  # the draws of the CPU path, in its order: view 1, view 2, then the box
            for pair in range(1 + mix):
                view, p = t(image)
                views[pair].append(view)
                params[pair].append(p)
            if mix:
                boxes.append(torch.tensor(random_scalemix_box(*views[0][-1].shape[-2:])))
        out = {kind: torch.stack(views[0] + views[1]),
               kind + "_params": torch.stack(params[0] + params[1])}
        if mix:  # all first views, then all second ones: finish_views pastes from the second half
            out[kind + "_box"] = torch.stack(boxes)
        return out

    def __call__(self, image):
        image = v2.functional.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        return {k: v for kind, n in self.counts().items()
                for k, v in self._views(kind, image, n).items()}


def collate_views(samples):
    """[(views, label)] -> ({kind: (n*B)x3xHxW}, labels B). View-major: rows i*B..(i+1)*B-1 are
    view i of every image, so equal-resolution views run in one forward and chunk(n) splits them."""
    kinds = samples[0][0].keys()
    batch = {k: torch.stack([views[k] for views, _ in samples], dim=1).flatten(0, 1) for k in kinds}
    return batch, torch.tensor([label for _, label in samples])


# ---- The paper's variance reference (Fig. 2) -----------------------------------------------------
# How much the encodings of one image spread over its views: variance.py (a checkpoint) and the
# scripts' variance monitor (asymmetry_variance, live).
def intra_sample_variance(z):
    """KxNxD encodings (K of N images each) -> N: the population variance (/K) of the K
    l2-normalised encodings averaged over the D dimensions, (1 - ||mean||^2) / D."""
    return F.normalize(z.float(), dim=-1).var(0, unbiased=False).mean(-1)


def uniform_reference(k, d):
    """Variance of K encodings uniform on the d-sphere: E||mean||^2 = 1/K, so (1 - 1/K)/d."""
    return (1 - 1 / k) / d


# ---- Data sets: ImageFolder roots, torchvision names, and a built-in synthetic one ---------------
class InputError(ValueError):
    """Bad user input (data, sizes, checkpoint): reported as one line before work starts."""


_warned = set()


def warn(message):
    """One line 'warning: ...' on stderr, once per message and process, on rank 0 only."""
    if message in _warned or rank() != 0:
        return
    _warned.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_weights(path):
    """torch.load(path, weights_only=True) onto the CPU; a bad file raises a one-line InputError (a
    refused pickle: its first non-tensor object, e.g. GLOBAL posix.system, and the fix)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))  # torch bolds part of its message
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            raise InputError(f"cannot load {path}: it holds objects other than tensors and plain "
                             f"containers (the first: {refused.group(1)}), which torch.load("
                             f"weights_only=True) refuses; if you trust the file, re-save only "
                             f"its tensors, e.g. torch.save(checkpoint['state_dict'], "
                             f"'weights.pth')") from None
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = (reason.group(1) if reason
                  else next((line for line in text.splitlines() if line.strip()), ""))
        raise InputError(f"cannot read {path}: {type(e).__name__}: "
                         f"{' '.join(reason.split()[:30])}") from None


def load_rgb(path):
    """Any PIL-readable image (grayscale, CMYK, RGBA, palette, 16-bit) -> RGB; errors name it."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except Exception as e:  # PIL raises many types for corrupt or truncated files
        raise InputError(f"cannot read image {path}: {e}") from None
    if image.mode in ("RGBA", "LA", "P"):  # composite transparency on white, not on black
        white = Image.new("RGBA", image.size, (255,) * 4)
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode == "I;16" or image.mode == "I":  # 16/32-bit grayscale: scale to 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255)
                                .astype(np.uint8))
    return image.convert("RGB")


class SeededDataset(torch.utils.data.Dataset):
    """An (image, label) data set whose augmentation is seeded per sample by (seed, epoch, index),
    not by worker count, world size or batch order: a resumed run sees an uninterrupted one's views,
    and 1 process == 2. (--skip-bad-images leaves unreadable images out before: check_images.)"""

    def __init__(self, base, transform, seed=0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        # seed the torch RNG (the v2 transforms draw from it) for this sample only, then restore
        # it: a loader without workers leaves the caller's stream alone
        state = torch.get_rng_state()
        torch.random.default_generator.manual_seed(
            ((self.seed * 1_000_003 + self.epoch) * len(self.base) + index) % 2**63)
        views = self.transform(image)
        torch.set_rng_state(state)
        return views, label


class LoadCheck(torch.utils.data.Dataset):
    """Item i -> (indices[i], None if base[indices[i]] loads, else why); header_only: no decode."""

    def __init__(self, base, indices, header_only=False):
        self.base, self.indices, self.header_only = base, indices, header_only

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        path = self.base.samples[self.indices[i]][0] if self.header_only else None
        try:
            if path:
                with Image.open(path) as image:
                    image.verify()
            else:
                self.base[self.indices[i]]
            return self.indices[i], None
        except Exception as e:  # InputError (load_rgb); PIL's own errors
            reason = " ".join(str(e).split()) or type(e).__name__
            return self.indices[i], f"cannot read image {path}: {reason}" if path else reason


def readable(base, indices=None, workers=0, what="images"):
    """--skip-bad-images for held-out metrics -> the indices (of `indices`, default all) that load,
    in order, and how many do not; each is read once up front (by `workers`), one warning."""
    indices = list(range(len(base))) if indices is None else list(indices)
    bad = unreadable(base, indices, False, workers)
    left_out = {index for index, _ in bad}
    if bad:
        warn(f"--skip-bad-images: {len(bad)} of {len(indices)} {what} cannot be read and are left "
             f"out (the first: {bad[0][1]})")
    if len(left_out) == len(indices):
        raise InputError(f"--skip-bad-images: none of the {len(indices)} {what} can be read "
                         f"(the first: {bad[0][1]})")
    return [index for index in indices if index not in left_out], len(bad)


def unreadable(base, indices, header_only, workers):
    """[(index, reason)] of the images of `indices` that cannot be read (LoadCheck by `workers`)."""
    loader = torch.utils.data.DataLoader(LoadCheck(base, indices, header_only), batch_size=64,
                                         num_workers=workers, collate_fn=list)
    return [(index, reason) for batch in loader for index, reason in batch if reason is not None]


def check_images(datasets, skip_bad=False, workers=0):
    """Before any work, each image file of `datasets` ({what: SeededDataset of ImageFiles}) parsed
    and verified by PIL: an unreadable one stops the run, named; skip_bad: each decoded, the bad
    left out (one warning). Each process checks every world-th file; all get every answer."""
    answers = {}
    for what, dataset in datasets.items():
        base = dataset.base
        if not hasattr(base, "samples"):
            continue
        key = tuple(base.samples)
        if key not in answers:
            files = list(range(rank(), len(base), world_size()))
            every = [unreadable(base, files, not skip_bad, workers)] * world_size()
            if world_size() > 1:
                torch.distributed.all_gather_object(every, every[0])
            answers[key] = sorted(row for rows in every for row in rows)
        bad = answers[key]
        if bad and not skip_bad:
            raise InputError(f"{len(bad)} of the {len(base)} {what} cannot be read (the first: "
                             f"{bad[0][1]}); --skip-bad-images leaves them out")
        left_out = {index for index, _ in bad}
        if len(left_out) == len(base):
            raise InputError(f"--skip-bad-images: none of the {len(base)} {what} can be read "
                             f"(the first: {bad[0][1]})")
        if bad:
            warn(f"--skip-bad-images: {len(bad)} of the {len(base)} {what} cannot be read and are "
                 f"left out (the first: {bad[0][1]})")
            dataset.base = torch.utils.data.Subset(base, [i for i in range(len(base))
                                                          if i not in left_out])


SYNTHETIC_CLASSES = ("circle", "square", "triangle", "plus", "ring",
                     "star", "stripes", "checker", "crescent", "ell")
# the polygons of each class at unit scale (rotated and placed per image); the others are discs
POLYGONS = {
    "square": [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]],
    "triangle": [[(math.cos(a), math.sin(a))
                  for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]],
    "plus": [[(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)],
             [(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)]],
    "star": [[((1.0 if k % 2 == 0 else 0.4) * math.cos(k * math.pi / 5 - math.pi / 2),
               (1.0 if k % 2 == 0 else 0.4) * math.sin(k * math.pi / 5 - math.pi / 2))
              for k in range(10)]],
    "stripes": [[(-0.9, y), (0.9, y), (0.9, y + 0.35), (-0.9, y + 0.35)]
                for y in (-0.9, -0.3, 0.3)],
    "checker": [[(x0, y0), (x0 + 0.6, y0), (x0 + 0.6, y0 + 0.6), (x0, y0 + 0.6)]
                for i in range(3) for j in range(3) if (i + j) % 2 == 0
                for x0, y0 in [(-0.9 + 0.6 * i, -0.9 + 0.6 * j)]],
    "ell": [[(-0.8, -1), (-0.3, -1), (-0.3, 0.5), (0.8, 0.5), (0.8, 1), (-0.8, 1)]],
}


class SyntheticShapes(torch.utils.data.Dataset):
    """Built-in, deterministic: a 64x64 shape per class (SYNTHETIC_CLASSES), random size, position,
    rotation, grey, on dark grey noise (only shape separates classes); train 5000, test 1000."""

    def __init__(self, split="train", size=64):
        self.split, self.size, self.n = split, size, 5000 if split == "train" else 1000
        self.targets = [i % len(SYNTHETIC_CLASSES) for i in range(self.n)]
        self.classes = list(SYNTHETIC_CLASSES)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        label, s = self.targets[index], self.size
        rng = np.random.default_rng([0 if self.split == "train" else 1, index])
        # light grey shapes on the same dark grey noise: no colour or background tells instances
        # apart (with colours, instance discrimination learns colour first and the kNN drops)
        background = np.full(3, 64)
        image = Image.fromarray(np.clip(background + rng.normal(0, 25, (s, s, 3)), 0, 255)
                                .astype(np.uint8))
        color, dark = (int(rng.integers(150, 256)),) * 3, tuple(int(b) for b in background)
        r = rng.uniform(0.3, 0.45) * s  # half-size of the shape: most crops still show part of it
        cx, cy = rng.uniform(r, s - r, 2)
        angle = rng.uniform(0, 2 * math.pi)
        draw, name = ImageDraw.Draw(image), SYNTHETIC_CLASSES[label]
        c, si = math.cos(angle), math.sin(angle)
        for points in POLYGONS.get(name, []):  # rotated by angle, placed at (cx, cy)
            draw.polygon([(cx + r * (x * c - y * si), cy + r * (x * si + y * c))
                          for x, y in points], fill=color)
        if name in ("circle", "ring", "crescent"):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        if name == "ring":
            q = 0.55 * r
            draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=dark)
        elif name == "crescent":
            dx, dy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
            draw.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=dark)
        return image, label


def has_image(folder):
    """Whether an image file (as ImageFolder reads) is at any depth of `folder`; stops at one."""
    return any(name.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)
               for _, _, files in os.walk(folder, followlinks=True) for name in files)


def folder_classes(root):
    """An ImageFolder split's class folders that hold an image, sorted; an empty one is left out,
    with a warning (in train/ it would take an index and shift the others)."""
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    empty = [name for name in names if not has_image(os.path.join(root, name))]
    if empty:
        warn(f"{root}: {len(empty)} empty class folder(s) left out: {', '.join(empty[:5])}"
             + (", ..." if len(empty) > 5 else ""))
    return [name for name in names if name not in empty]


class ImageFiles(torch.utils.data.Dataset):
    """An ImageFolder split read by load_rgb. classes: all splits' order (train/'s sorted; default:
    this folder's); a class here not in it: an error (unscorable); one absent: a warning."""

    def __init__(self, root, classes=None):
        found = folder_classes(root)
        if not found:
            raise InputError(f"no images found under {root}")
        classes = found if classes is None else list(classes)
        unknown = [name for name in found if name not in classes]
        if unknown:
            raise InputError(f"{root} has class folder(s) that train/ lacks: "
                             f"{', '.join(unknown[:5])}" + (", ..." if len(unknown) > 5 else "")
                             + " (every split is numbered by train/'s classes)")
        absent = [name for name in classes if name not in found]
        if absent:
            warn(f"{root} has no images of {len(absent)} of the {len(classes)} classes: "
                 f"{', '.join(absent[:5])}" + (", ..." if len(absent) > 5 else ""))
        index = {name: i for i, name in enumerate(classes)}
        self.samples = torchvision.datasets.folder.make_dataset(
            root, {name: index[name] for name in found}, torchvision.datasets.folder.IMG_EXTENSIONS)
        self.targets = [label for _, label in self.samples]
        self.classes = classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return load_rgb(path), label


def folder_split(data, split):
    """data/split (train, val or test) as ImageFiles numbered by data/train/'s classes, so a label
    means the same class in every split; without train/ (or images in it) it numbers its own."""
    train = os.path.join(data, "train")
    classes = folder_classes(train) if os.path.isdir(train) and split != "train" else []
    return ImageFiles(os.path.join(data, split), classes or None)


TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}


def base_dataset(data, split, data_root="data"):
    """data: "synthetic" | "cifar10" | "cifar100" | "stl10" | an ImageFolder root (folder_split).
    split: "train", "train_labeled" (the kNN bank; differs for STL-10 only) or "test"."""
    if data == "synthetic":
        return SyntheticShapes("train" if split.startswith("train") else "test")
    if data in TORCHVISION_SETS:
        cls = getattr(torchvision.datasets, TORCHVISION_SETS[data])
        root = os.path.join(data_root, data)
        if data == "stl10":
            kwargs = {"split": {"train": "train+unlabeled", "train_labeled": "train",
                                "test": "test"}[split]}
        else:
            kwargs = {"train": split.startswith("train")}
        try:
            return cls(root, download=False, **kwargs)
        except RuntimeError:
            pass  # not there yet: try to download
        try:
            return cls(root, download=True, **kwargs)
        except Exception as e:
            raise InputError(f"{data} is not in {root} and could not be downloaded "
                             f"({type(e).__name__}: {e}); download it elsewhere and copy it to "
                             f"{root}, or pass --data-root") from None
    if not os.path.isdir(data):
        raise InputError(f"--data {data}: no such directory (and not one of synthetic, "
                         f"{', '.join(TORCHVISION_SETS)})")
    names = ["train"] if split.startswith("train") else ["val", "test"]
    for name in names:
        if os.path.isdir(os.path.join(data, name)):
            return folder_split(data, name)
    raise InputError(f"--data {data}: expected an ImageFolder root with a {' or '.join(names)}/ "
                     f"folder")


def dataset(data, split, transform, data_root="data", seed=0):
    """base_dataset(data, split) with a per-sample-seeded transform (SeededDataset)."""
    return SeededDataset(base_dataset(data, split, data_root), transform, seed)


# ---- --data-on-device: a small data set kept on the device, every view made there ----------------
# At 32 px a worker makes two views of a few hundred CIFAR images a second, a GPU step uses
# thousands (benchmarks/dataloader.py): MultiCrop starves it even with 16 workers. A small set fits
# on the device as uint8 (CIFAR-10: 150 MB); every draw and pixel op runs there, batched: the crop
# box (torchvision's ten tries and fallback), its antialiased resize (torchvision's weights as two
# matrix products, which also flip), --gpu-aug's colour. Views equal the CPU path's in distribution,
# not image by image: a device generator seeded per (seed, epoch, batch, process) draws them (the
# same on resuming, others with another process count). RandAugment stays on the workers.
def random_crop_boxes(n, height, width, scale, generator, ratio=(3 / 4, 4 / 3), tries=10):
    """n boxes (top, left, height, width) as RandomResizedCrop: the first fitting of `tries` draws
    (area ~ scale x HxW, log-uniform aspect), else the centred image, aspect clamped to `ratio`."""
    device = generator.device
    area = height * width * torch.empty(n, tries, device=device).uniform_(
        *scale, generator=generator)
    aspect = torch.empty(n, tries, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 if none: replaced)
    w, h, fitted = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    if width / height < ratio[0]:  # the fallback: the whole image, its aspect ratio clamped
        fallback = (round(width / ratio[0]), width)
    elif width / height > ratio[1]:
        fallback = (height, round(height * ratio[1]))
    else:
        fallback = (height, width)
    h, w = torch.where(fitted, h, fallback[0]), torch.where(fitted, w, fallback[1])
    u = torch.rand(2, n, device=device, generator=generator)
    top = torch.where(fitted, (u[0] * (height - h + 1)).floor(), (height - fallback[0]) // 2)
    left = torch.where(fitted, (u[1] * (width - w + 1)).floor(), (width - fallback[1]) // 2)
    return torch.stack([top, left, h, w], 1).long()


def cubic(x, a=-0.5):
    """The bicubic convolution kernel of torchvision's (and PIL's) antialiased resize."""
    x = x.abs()
    return torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                       torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def resize_weights(offset, length, size, full, interpolation="bilinear"):
    """NxSIZExFULL weights of torchvision's antialiased resize of N crops [offset, offset + length)
    of a `full`-pixel axis to `size`: triangle or cubic, stretched when shrinking, 0 outside."""
    offset, length = offset.to(torch.float32), length.to(torch.float32)
    scale = length / size  # input pixels per output pixel
    support = scale.clamp(min=1.0)
    center = scale[:, None] * (torch.arange(size, device=offset.device) + 0.5)  # NxS, crop coords
    pixel = torch.arange(full, device=offset.device) - offset[:, None]  # NxFULL, crop coordinates
    distance = (pixel[:, None, :] + 0.5 - center[:, :, None]) / support[:, None, None]
    inside = ((pixel >= 0) & (pixel < length[:, None]))[:, None, :]
    weights = (cubic(distance) if interpolation == "bicubic"
               else (1 - distance.abs()).clamp(min=0)) * inside
    return weights / weights.sum(2, keepdim=True)


def resized_crops(images, boxes, size, flip, interpolation="bilinear"):
    """Nx3xHxW uint8, N boxes (top, left, height, width), N flips -> Nx3xSxS in [0, 1]: antialiased
    resized_crop as torchvision, mirrored where flip: rows x image x columns, clipped as uint8."""
    rows = resize_weights(boxes[:, 0], boxes[:, 2], size, images.shape[-2], interpolation)  # NxSxH
    cols = resize_weights(boxes[:, 1], boxes[:, 3], size, images.shape[-1], interpolation)  # NxSxW
    cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)  # mirrored: columns read backwards
    x = images.to(torch.float32) * (1 / 255)
    return (rows[:, None] @ x @ cols.transpose(1, 2)[:, None]).clamp(0, 1)


def random_colour_params(recipe, n, size, generator):
    """n rows of PARAMS drawn as the recipe's view_transform: ColorJitter with p JITTER_P (factors
    ~ U[max(0, 1 - s), 1 + s], hue ~ U[-h, h], the four ops in random order), grayscale with p
    GRAY_P, blur (sigma ~ U(0.1, 2)) with the recipe's p from 64 px up, solarize with its p."""
    _, (brightness, contrast, saturation, hue), blur_p, solarize_p = RECIPES[recipe]
    device = generator.device
    u = torch.rand(n, 9, device=device, generator=generator)
    factors = [max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * u[:, i]
               for i, s in enumerate((brightness, contrast, saturation))]
    order = torch.rand(n, 4, device=device, generator=generator).argsort(1)  # a permutation each
    blur = u[:, 6] < (blur_p if blur_kernel(size) else 0.0)
    return torch.stack([(u[:, 3] < JITTER_P).float(), *factors, hue * (2 * u[:, 4] - 1),
                        *order.float().unbind(1), (u[:, 5] < GRAY_P).float(),
                        torch.where(blur, 0.1 + 1.9 * u[:, 7], 0.0),
                        (u[:, 8] < solarize_p).float()], 1)


def random_scalemix_boxes(n, height, width, generator):
    """n ScaleMix boxes (top, bottom, left, right) as random_scalemix_box draws them, on device."""
    u = torch.rand(3, n, device=generator.device, generator=generator)
    cut = (1 - u[0]).sqrt()
    half_h = (height * cut).floor().div(2, rounding_mode="floor")
    half_w = (width * cut).floor().div(2, rounding_mode="floor")
    center_y, center_x = (u[1] * height).floor(), (u[2] * width).floor()
    return torch.stack([(center_y - half_h).clamp(min=0), (center_y + half_h).clamp(max=height),
                        (center_x - half_w).clamp(min=0), (center_x + half_w).clamp(max=width)],
                       1).long()


class DeviceViews:
    """A Views' views (kinds, counts, recipes; not RandAugment) made on the device: __call__(uint8
    images, index, generator) -> {kind: (n*B)x3xSxS normalised floats}, view-major as collate's."""

    def __init__(self, views):
        if any(stronger for kind, (_, _, _, stronger) in views.recipes.items()
               if kind in views.counts()):
            raise InputError("--data-on-device makes crops, flips and colour on the device, not "
                             "StrongerAug's RandAugment (--asym-aug, --source-aug/--target-aug "
                             "stronger): drop one of the two")
        self.counts, self.interpolation = views.counts(), views.interpolation
        self.recipes = {kind: (recipe, size, scale or ((0.08, 1.0) if recipe == "weaker"
                                                       else (RECIPES[recipe][0], 1.0)))
                        for kind, (recipe, size, scale, _) in views.recipes.items()}
        self.mixed = {kind for kind in ("source", "target") if views.scalemix_on in (kind, "both")}

    def view(self, kind, images, generator):
        """One view of each of the N images -> Nx3xSxS floats in [0, 1], before normalisation."""
        recipe, size, scale = self.recipes[kind]
        n, _, height, width = images.shape
        boxes = random_crop_boxes(n, height, width, scale, generator)
        flip = torch.rand(n, device=images.device, generator=generator) < 0.5
        x = resized_crops(images, boxes, size, flip, self.interpolation)
        if recipe == "weaker":  # crop and flip only
            return x
        return photometric(x, random_colour_params(recipe, n, size, generator))

    def __call__(self, images, index, generator):
        batch = {}
        mean, std = imagenet_mean_std(images.device)
        for kind, n in self.counts.items():
            chosen = images[index.repeat(n)]  # (n*B)x3xHxW, view-major
            x = (self.view(kind, chosen, generator) - mean) / std
            if kind in self.mixed:  # ScaleMix: a box of a second view pasted into each
                second = (self.view(kind, chosen, generator) - mean) / std
                x = paste_boxes(x, second, random_scalemix_boxes(len(x), *x.shape[-2:], generator))
            batch[kind] = x
        return batch


class OnDevice(torch.utils.data.Dataset):
    """--data-on-device: a SeededDataset's images decoded once onto the device (uint8 Nx3xHxW), its
    Views as DeviceViews; batches(...) replaces the DataLoader; len() and .epoch are the set's."""

    def __init__(self, train_set, workers=0, device=None):
        self.views = DeviceViews(train_set.transform)  # bad settings fail before any decoding
        self.device = device or (torch.device("cuda", torch.cuda.current_device())
                                 if torch.cuda.is_available() else torch.device("cpu"))
        self.seed, self.epoch, self.n = train_set.seed, 0, len(train_set)
        decoded = SeededDataset(train_set.base, v2.functional.pil_to_tensor)
        images, labels = [], []
        for batch, y in torch.utils.data.DataLoader(decoded, batch_size=256, num_workers=workers,
                                                    collate_fn=stack_images):
            if not images:
                check_device_memory(batch[0].numel() * len(decoded), self.device)
            elif batch.shape[1:] != images[0].shape[1:]:
                raise InputError(f"--data-on-device needs images of one size: found "
                                 f"{shape_text(batch[0])} after {shape_text(images[0][0])}")
            images.append(batch.to(self.device))
            labels.append(y.to(self.device))
        self.images, self.labels = torch.cat(images), torch.cat(labels)

    def __len__(self):
        return self.n

    def batches(self, indices, batch_size, epoch, first_batch, rank=0):
        """The full batches of `indices` -> (views, labels) on the device; batch b of the epoch
        draws from a generator seeded by (seed, epoch, first_batch + b, rank)."""
        order = torch.tensor(indices[:len(indices) // batch_size * batch_size], dtype=torch.long)
        if self.device.type == "cuda":  # one asynchronous copy per epoch
            order = order.pin_memory()
        order = order.to(self.device, non_blocking=True)
        generator = torch.Generator(self.device)
        for b, index in enumerate(order.split(batch_size)):
            generator.manual_seed((((self.seed * 1_000_003 + epoch) * 1_000_033 + first_batch + b)
                                   * 4099 + rank) % 2**63)
            yield self.views(self.images, index, generator), self.labels[index]


def shape_text(image):
    return "x".join(map(str, image.shape))


def stack_images(samples):
    """[(uint8 3xHxW, label)] -> (Nx3xHxW, labels N); images of unequal sizes are bad input here."""
    for image, _ in samples[1:]:
        if image.shape != samples[0][0].shape:
            raise InputError(f"--data-on-device needs images of one size: found "
                             f"{shape_text(image)} after {shape_text(samples[0][0])}")
    return (torch.stack([image for image, _ in samples]),
            torch.tensor([label for _, label in samples]))


def check_device_memory(nbytes, device):
    """--data-on-device keeps at most half of a GPU's memory for the images."""
    if device.type == "cuda" and nbytes > torch.cuda.get_device_properties(device).total_memory / 2:
        raise InputError(f"--data-on-device: the training images take {nbytes / 2**30:.1f} GiB as "
                         f"uint8, more than half of the device's memory; use the data workers "
                         f"(drop --data-on-device)")


# ---- Across processes (the scripts' plumbing) ----------------------------------------------------
# Collectives, each the identity on one process; the CPU stand-in for SyncBN; --bn-splits.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # save and stop (the scripts)


def ignore_stop_signals(worker_id=None):
    """A data worker's start: the stop signals are for the training process, which then stops
    its workers itself (a scheduler signals the whole process group)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@torch.no_grad()
def gather(x):
    """Local NxC -> (world*N)xC, the processes' rows in rank order, no gradient."""
    if world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(world_size())]
    torch.distributed.all_gather(out, x.contiguous())
    return torch.cat(out)


class AllReduce(torch.autograd.Function):
    """Sum over the processes of `group`, with gradient: every output depends on every input, so
    each input's gradient is the sum of the outputs' gradients (an all-reduce again)."""

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather_with_grad(x):
    """Local NxC -> (world*N)xC in rank order, with gradient: each process's rows placed in zeros,
    summed over the processes (AllReduce); its rows get the sum of the gradients reaching them."""
    if world_size() == 1:
        return x
    out = x.new_zeros(world_size() * len(x), *x.shape[1:])
    out[rank() * len(x):(rank() + 1) * len(x)] = x
    return AllReduce.apply(out)


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
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
            stats = AllReduce.apply(stats, self.group)
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


class SplitBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm over `splits` groups of the batch (sample i in group i mod splits): `splits`
    devices' statistics on one; running statistics: the mean of theirs. 1-d and 2-d inputs."""

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
        y = F.batch_norm(x.reshape(n // k, k * c, *x.shape[2:]), mean, var, weight, bias, True,
                         self.momentum, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.copy_(mean.view(k, c).mean(0))
            self.running_var.copy_(var.view(k, c).mean(0))
        return y.view_as(x)


def replace_bn(module, make):
    """Replace every plain nn.BatchNorm1d/2d inside `module` by make(bn), keeping its state."""
    for name, child in module.named_children():
        if type(child) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d):
            new = make(child)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(child.running_mean.device))
        else:
            replace_bn(child, make)
    return module


def sync_bn(module, group=None):
    """SyncBN over `group` (None: all) for every BN of `module`: nn.SyncBatchNorm or on CPU ours."""
    if torch.cuda.is_available():
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    return replace_bn(module, lambda bn: GlobalBatchNorm(bn.num_features, group, eps=bn.eps,
                                                         momentum=bn.momentum, affine=bn.affine))


def split_bn(module, splits):
    """--bn-splits: every plain BN of `module` normalises its batch in `splits` groups."""
    return replace_bn(module, lambda bn: SplitBatchNorm(bn.num_features, splits, eps=bn.eps,
                                                        momentum=bn.momentum, affine=bn.affine))


def autocast(device, amp):
    """The mixed precision of --amp ("bf16" | "fp16" | "off") on `device`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---- A run's plumbing: its flags' help, start, checks before any work, end (the scripts') --------
EXIT_BAD_INPUT, EXIT_STOPPED = 2, 3  # a run's own exit codes; 1: any other failure


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default (where it has one) and the docstring's examples as given."""

    def _get_help_string(self, action):
        shown = action.default is not None and action.default is not False  # (0 == False)
        return super()._get_help_string(action) if shown else action.help


def init_distributed(dist_timeout):
    """torchrun (env://): a process per GPU (NCCL) or CPU share (gloo); -> this process's device."""
    if "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=dist_timeout)
        if torch.cuda.is_available():  # one GPU per process, named so that NCCL need not guess
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            torch.distributed.init_process_group("gloo", timeout=timeout)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def end_run(code, message):
    """Every process exits with `code`; rank 0 prints `message` (one line) first."""
    if rank() == 0:
        print(message, file=sys.stderr, flush=True)
    if world_size() > 1:
        torch.distributed.barrier()  # the line is out before torchrun tears the job down
    sys.exit(code)


@contextlib.contextmanager
def agreed():
    """Checks each process runs alone: an InputError on any ends the run on all, before any work,
    with one line (naming the rank where not every process had it) and exit code 2."""
    error = None
    try:
        yield
    except InputError as e:
        error = str(e)
    errors = [error]
    if world_size() > 1:
        errors = [None] * world_size()
        torch.distributed.all_gather_object(errors, error)
    failed = [(r, message) for r, message in enumerate(errors) if message is not None]
    if failed:
        where = "" if len(failed) == world_size() else f" (rank {failed[0][0]})"
        end_run(EXIT_BAD_INPUT, f"error{where}: {failed[0][1]}")


def non_finite(tree, prefix=""):
    """The names of the floating-point tensors holding NaN or infinity in a nest of dicts."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not tree.isfinite().all() else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, (list, tuple)) else ()
    return [name for key, value in items
            for name in non_finite(value, f"{prefix}.{key}" if prefix else str(key))]


def syncbn_group(size):
    """This process's SyncBN group: None (all processes) or consecutive groups of `size`."""
    if not size or size == world_size():
        return None
    groups = [torch.distributed.new_group(list(range(start, start + size)))
              for start in range(0, world_size(), size)]
    return groups[rank() // size]


def common_problems(args, n_train):
    """The impossible settings of the flags all six scripts share -> a list of messages."""
    world = world_size()
    local, problems = args.batch_size // world, []
    if args.batch_size % world:
        problems.append(f"--batch-size {args.batch_size} is not divisible by the {world} "
                        f"processes")
    elif args.bn_splits < 1 or local % args.bn_splits or local // args.bn_splits < 2:
        problems.append(f"the per-process batch {local} must split into --bn-splits "
                        f"{args.bn_splits} groups of 2 or more")
    if n_train < args.batch_size:
        problems.append(f"--batch-size {args.batch_size} is larger than the {n_train} training "
                        f"images")
    if args.syncbn_group_size and world % args.syncbn_group_size:
        problems.append(f"--syncbn-group-size {args.syncbn_group_size} does not divide the "
                        f"{world} processes")
    if min(args.mean_enc, args.mean_enc_source, args.epochs, args.print_freq) < 1:
        problems.append("--mean-enc, --mean-enc-source, --epochs, --print-freq must be 1 or more")
    if min(args.multicrop, args.lr, args.wd, args.save_every) < 0:
        problems.append("--multicrop, --lr, --wd and --save-every must not be negative")
    if args.image_size < 16:
        problems.append(f"--image-size {args.image_size} is too small: 16 or more")
    if args.variance_every >= 0 and (args.variance_views < 2 or args.variance_images < 1):
        problems.append("--variance-views must be 2 or more and --variance-images 1 or more")
    return problems


def start_line(framework, args, n_images, steps_per_epoch, step, last):
    """A run's first line: its data, length, processes and designs on each side, in the paper's
    words ('source: ScaleMix; target: SyncBN, MeanEnc 2'); without a GPU at ImageNet's image size
    (224 px or more), two lines more: a note pointing to the README's CPU example."""
    designs = []
    for side, n in (("source", args.mean_enc_source), ("target", args.mean_enc)):
        aug = {"weaker": "WeakerAug", "stronger": "StrongerAug"}.get(getattr(args, side + "_aug"))
        names = [name for name, place in ((f"MultiCrop {args.multicrop}", args.multicrop and
                 args.multicrop_on), ("ScaleMix", args.scalemix_on), ("SyncBN", args.syncbn_on))
                 if place in (side, "both")] + [aug] * bool(aug) + [f"MeanEnc {n}"] * (n > 1)
        designs.append(f"{side}: {', '.join(names) or 'no design'}")
    line = (f"{framework} {f'resumed at step {step}' if step else 'starts'}: {args.data}, "
            f"{n_images} training images; {steps_per_epoch} steps an epoch, {last} in all; "
            f"{world_size()} process(es) x {args.batch_size // world_size()} images a step; "
            f"{'; '.join(designs)}; writes {args.output_dir}")
    if not torch.cuda.is_available() and args.image_size >= 224:
        # the defaults are ImageNet's, and a newcomer on a CPU would wait hours not knowing why;
        # a note, not an error: the run goes on
        line += (f"\nnote: no GPU, and these are ImageNet's settings ({args.arch} at "
                 f"{args.image_size} px, batch {args.batch_size}): hours on a CPU.\n  The "
                 "README's CPU example (--arch resnet18 --image-size 32 --batch-size 128 ...) "
                 "takes minutes.")
    return line


def progress(step, last, first, start, batch_size=0):
    """'step 40/2340, ETA 0:05:12' (batch_size: with images/s) at the pace since step `first`."""
    pace = (step - first) / (time.time() - start)  # steps a second
    speed = f", {batch_size * pace:.4g} images/s" if batch_size else ""
    return f"step {step}/{last}{speed}, ETA {datetime.timedelta(seconds=round((last-step) / pace))}"


def end_line(args, step, monitors):
    """A run's last line: what it saved where, and its last kNN top-1 and variances (with their
    ratio v_target / v_source and which side varies more)."""
    line = f"finished at step {step}: {args.output_dir}/checkpoint.pth and backbone.pth"
    line += f"; kNN top-1 {monitors['knn_top1']:.1f}%" if "knn_top1" in monitors else ""
    if "v_source" in monitors:
        line += f"; v_source {monitors['v_source']:.4g}, v_target {monitors['v_target']:.4g}"
        # what was measured only: the paper reports no such ratio for its baseline
        v_source, v_target = monitors["v_source"], monitors["v_target"]
        if v_source > 0:
            line += f"; v_target / v_source {v_target / v_source:.3g}"
            if v_target != v_source:
                more, less = ("target", "source") if v_target > v_source else ("source", "target")
                line += f" (the {more} varies more than the {less}"
                line += "; the paper's designs aim below 1)" if more == "target" else ")"
    return line


def say(message):
    """A line for the user, on stdout, from rank 0 only."""
    if rank() == 0:
        print(message, flush=True)


# ---- The monitors (the scripts' plumbing) --------------------------------------------------------
# A weighted kNN on backbone features, sharded; the paper's source and target variance.
@torch.no_grad()
def extract_features(backbone, loader, device, args):
    """l2-normalised backbone features and labels of a loader's images."""
    features, labels = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if args.channels_last:
            images = images.to(memory_format=torch.channels_last)
        with autocast(device, args.amp):
            features.append(F.normalize(backbone(images).float(), dim=1))
        labels.append(y.to(device))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def gather_padded(x, fill):
    """Local rows of unequal counts -> all processes' rows, padded with `fill` to equal counts."""
    n_max = int(gather(torch.tensor([len(x)], device=x.device)).max())
    pad = torch.full((n_max - len(x), *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    return gather(torch.cat([x, pad]))


@torch.no_grad()
def knn_accuracy(backbone, bank_loader, test_loader, device, args):
    """Top-1 (%) of a weighted kNN classifier (--knn-k, --knn-t) on backbone features. Each process
    keeps its shard of the bank; the k nearest of every shard are gathered and merged."""
    was_training = backbone.training
    backbone.eval()
    bank, bank_labels = extract_features(backbone, bank_loader, device, args)
    test, test_labels = extract_features(backbone, test_loader, device, args)
    test, test_labels = gather_padded(test, 0.0), gather_padded(test_labels, -1)  # every image
    test, test_labels = test[test_labels >= 0], test_labels[test_labels >= 0]
    k = min(args.knn_k, int(gather(torch.tensor([len(bank)], device=device)).min()))
    sims, labels = [], []
    for chunk in test.split(1024):
        s, i = (chunk @ bank.T).topk(k, dim=1)  # cosine similarity to this shard's k nearest
        sims.append(s)
        labels.append(bank_labels[i])
    sims = torch.cat(gather(torch.cat(sims)[None]).unbind(0), dim=1)  # Nx(world*k)
    labels = torch.cat(gather(torch.cat(labels)[None]).unbind(0), dim=1)
    sims, top = sims.topk(k, dim=1)  # the k nearest of the whole bank
    weights = (sims / args.knn_t).exp()
    n_classes = int(max(labels.max(), test_labels.max())) + 1
    scores = torch.zeros(len(test), n_classes, device=device)
    scores.scatter_add_(1, labels.gather(1, top), weights)
    backbone.train(was_training)
    return (scores.argmax(1) == test_labels).float().mean().item() * 100


# +-----------------------------------------------------------------------------------------+
# | The paper's central quantity (Fig. 2): how much the l2-normalised encodings of an image |
# | spread over its views. Keep the target's below the source's: designs that raise it     |
# | belong on the source, those that lower it on the target. Each side is measured with    |
# | its own views (its recipe and designs) and its own BN (AsymBN), as training encodes    |
# | it; variance.py --sides gives the same numbers for a checkpoint.                       |
# +-----------------------------------------------------------------------------------------+
def probe_batches(n_images, args):
    """The variance probe's BN batches: G = min(--batch-size, images) consecutive images, G a
    multiple of the devices (processes x --bn-splits), image k to process k mod world as training's
    sampler. -> per batch, per draw j < r, this process's items (image x r + j)."""
    devices, r = world_size() * args.bn_splits, args.variance_views
    g = min(args.batch_size, n_images) // devices * devices
    if g < 2 * devices:
        raise InputError(f"the variance monitor needs {2 * devices} or more held-out images (BN "
                         f"batches of 2 per device), the split has {n_images}: "
                         f"pass --variance-every -1")
    return [[image * r + j for image in range(start + rank(), start + g, world_size())]
            for start in range(0, n_images - g + 1, g) for j in range(r)]


def probe_loader(held_out, views, args):
    """The monitor's probe: the first --variance-images held-out images, each drawn --variance-views
    times with the training `views`, draw j of image i seeded by its item i * r + j: the same views
    at every evaluation. A batch: one draw of one BN batch's images (probe_batches), view-major."""
    n = min(args.variance_images, len(held_out))
    draws = torch.utils.data.Subset(held_out, [i for i in range(n)
                                               for _ in range(args.variance_views)])
    return torch.utils.data.DataLoader(
        SeededDataset(draws, views, args.seed), batch_sampler=probe_batches(n, args),
        num_workers=args.workers, collate_fn=collate_views, pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed))


@torch.no_grad()
def side_encodings(encode, batch, side, args):
    """One draw of a side's views -> its NxD encodings, as training makes them: the standard views'
    (MeanEnc: the un-normalised mean of n) and each of MultiCrop's small crops' on this side."""
    n = args.mean_enc_source if side == "source" else args.mean_enc
    z = encode(batch[side], side).float()
    encodings = [z.view(n, -1, z.shape[-1]).mean(0)]
    if side + "_small" in batch:
        small = batch[side + "_small"]
        per_crop = args.multicrop_per_crop and side == "source"
        crops = small.chunk(args.multicrop) if per_crop else [small]
        z_small = torch.cat([encode(x, side) for x in crops]).float()
        encodings += z_small.chunk(args.multicrop)
    return encodings


@torch.no_grad()
def asymmetry_variance(encoders, encode, loader, device, args):
    """Each side's variance on the probe (probe_loader): per image, that of its K l2-normalised
    encodings (intra_sample_variance; K = r draws x (1 + m) where MultiCrop's m crops are on the
    side, else r), v = the mean over images. encode(x, side): the script's side_encode; BN in
    train mode; the (source, target) encoders left as they were (BN statistics restored, the RNG
    forked and seeded by --seed). -> v_source, v_target, v_ratio (target/source), v_uniform_*
    ((1 - 1/K)/d: uniform on the sphere), v_std_* (SimSiam's std x sqrt(d) per draw, averaged)."""
    sides, r = ("source", "target"), args.variance_views
    modes = [encoder.training for encoder in encoders]
    buffers = [b.clone() for encoder in encoders for b in encoder.buffers()]
    sums = {side: torch.zeros(2, dtype=torch.float64, device=device) for side in sides}
    moments, k = {}, {}  # side -> 2 x r x D: sums of the standard encodings and their squares; K
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(args.seed)
        for encoder in encoders:
            encoder.train()
        draws = {side: [] for side in sides}
        for i, (batch, _) in enumerate(loader):
            batch = finish_views({kind: x.to(device, non_blocking=True)
                                  for kind, x in batch.items()})
            if args.channels_last:
                batch = {kind: x.to(memory_format=torch.channels_last) for kind, x in batch.items()}
            with autocast(device, args.amp):
                for side in sides:
                    draws[side].append(side_encodings(encode, batch, side, args))
            if i % r < r - 1:
                continue
            for side in sides:  # the r draws of this batch's images are in
                z = torch.stack([e for draw in draws[side] for e in draw])  # KxNxD
                v = intra_sample_variance(z)  # N
                sums[side][0] += v.double().sum()
                sums[side][1] += len(v)
                u = F.normalize(torch.stack([draw[0] for draw in draws[side]]).double(), dim=-1)
                moments[side] = moments.get(side, 0) + torch.stack([u.sum(1), (u ** 2).sum(1)])
                k[side], draws[side] = len(z), []
    for b, saved in zip([b for encoder in encoders for b in encoder.buffers()], buffers):
        b.copy_(saved)
    for encoder, mode in zip(encoders, modes):
        encoder.train(mode)
    stats = torch.cat([torch.cat([sums[side], moments[side].flatten()]) for side in sides])
    if world_size() > 1:
        torch.distributed.all_reduce(stats)  # one all-reduce for both sides
    record = {}
    for side, part in zip(sides, stats.split(len(stats) // 2)):
        (v_sum, n), (s1, s2) = part[:2], part[2:].view(moments[side].shape)
        std = ((s2 - s1 ** 2 / n) / (n - 1)).clamp(min=0).sqrt()  # rxD: over the images
        d = std.shape[1]
        record.update({f"v_{side}": (v_sum / n).item(),
                       f"v_uniform_{side}": uniform_reference(k[side], d),
                       f"v_std_{side}": (std.mean(1) * math.sqrt(d)).mean().item()})
    return {"v_source": record["v_source"], "v_target": record["v_target"],
            "v_ratio": record["v_target"] / record["v_source"],
            **{key: record[key] for key in ("v_uniform_source", "v_uniform_target", "v_std_source",
                                            "v_std_target")}}
