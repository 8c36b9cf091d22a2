"""Everything between an image on disk and the batch of views, shared by the six *_asym.py scripts.

The paper (Wang et al., CVPR 2022) splits a Siamese pair into a gradient-updated *source*
encoder and a no-gradient *target* encoder, and finds that designs raising the variance of
the encodings belong on the source (MultiCrop, ScaleMix, StrongerAug) and designs lowering
it on the target (WeakerAug, MeanEnc; AsymBN lives in the model). This file builds the views:

    views = Views(size=32, source_aug="stronger", target_aug="weaker", multicrop=6, ...)
    train_set = dataset("synthetic", "train", views)
    loader = DataLoader(train_set, batch_size=64, collate_fn=collate_views)
    batch, labels = next(iter(loader))  # batch["source"]: (n_s*B)x3xHxW, view-major

Recipes are torchvision.transforms.v2 pipelines on uint8 tensors (one decode per image). With
--gpu-aug (Views(..., device_aug=True)) the views' colour operations run on the batch on the
device instead: the training loop calls finish_views(batch), the identity otherwise.
"""
import functools
import hashlib
import json
import math
import os
import re
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------
# Recipes: one augmentation pipeline per view
# ---------------------------------------------------------------------------------------------
# name -> (RandomResizedCrop min scale, ColorJitter strengths, blur p, solarize p)
RECIPES = {
    "mocov2": (0.2, (0.4, 0.4, 0.4, 0.1), 0.5, 0.0),
    "byol1": (0.08, (0.4, 0.4, 0.2, 0.1), 1.0, 0.0),  # BYOL's view 1
    "byol2": (0.08, (0.4, 0.4, 0.2, 0.1), 0.1, 0.2),  # BYOL's view 2
    "simclr": (0.08, (0.8, 0.8, 0.8, 0.2), 0.5, 0.0),
}
# The view pair each framework uses by default (source view, target view).
FRAMEWORK_RECIPES = {
    "mocov2": ("mocov2", "mocov2"),
    "simsiam": ("mocov2", "mocov2"),
    "byol": ("byol1", "byol2"),
    "mocov3": ("byol1", "byol2"),
    "barlow": ("byol1", "byol2"),
    "simclr": ("simclr", "simclr"),
}
# Every RandomResizedCrop of a framework (standard, MultiCrop's small crops, WeakerAug, --gpu-aug)
# resamples as its paper: bicubic in BYOL and Barlow Twins, bilinear (torchvision's default) in
# MoCo v2/v3, SimSiam and SimCLR.
FRAMEWORK_INTERPOLATION = {"mocov2": "bilinear", "simsiam": "bilinear", "mocov3": "bilinear",
                           "simclr": "bilinear", "byol": "bicubic", "barlow": "bicubic"}
JITTER_P, GRAY_P = 0.8, 0.2  # every recipe: ColorJitter applied with p 0.8, grayscale with p 0.2
MULTICROP_SCALE = (0.05, 0.14)  # small crops; the standard crops then start at 0.14
MULTICROP_SIZE_AT_224 = 96


def small_crop_size(size):
    """MultiCrop crop size: 96 px at 224, scaled and rounded to a multiple of 8 (16 px at 32)."""
    return max(8, 8 * round(size * MULTICROP_SIZE_AT_224 / 224 / 8))


def blur_kernel(size):
    """Odd Gaussian-blur kernel of about 10% of the image (23 px at 224); no blur below 64 px,
    as in the small-data recipes (blurring a 32 px image mostly destroys it)."""
    return 0 if size < 64 else int(0.1 * size) // 2 * 2 + 1


class GaussianBlur(torch.nn.Module):
    """Gaussian blur of a uint8 3xHxW image, sigma ~ U(0.1, 2) px, done by PIL as in the official
    MoCo v2 / SimSiam code. It is several times faster on a CPU than torchvision's tensor blur with
    blur_kernel(224) = 23 taps (benchmarks/dataloader.py), and matches it to within about one grey
    level (PIL approximates the Gaussian by box blurs; tests/test_augment.py)."""

    def __init__(self, sigma=(0.1, 2.0)):
        super().__init__()
        self.sigma = sigma

    def forward(self, image):
        sigma = torch.empty(1).uniform_(*self.sigma).item()  # the torch RNG: seeded per sample
        blurred = Image.fromarray(image.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(sigma))
        return torch.from_numpy(np.array(blurred)).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# StrongerAug's RandAugment: the official code's timm rand_augment_transform("rand-m10-n2-mstd0.5")
# ---------------------------------------------------------------------------------------------
# Two ops per image, drawn uniformly with replacement from RA_OPS; each is applied with p 0.5 at
# a magnitude m ~ N(10, 0.5) clipped to [0, 10], i.e. at level l = m / 10 (m10 is timm's maximum,
# not a third of torchvision's range). Every op reproduces PIL's, as timm calls it, on uint8
# CxHxW tensors, to the bit: invert, posterize, solarize, equalize, brightness and sharpness are
# torchvision's v2 ops (equal to PIL's); colour, contrast and autocontrast follow PIL's rounding
# (torchvision's are a grey level off on up to half the pixels); the geometric ops call PIL itself
# (pil_geometric: torchvision's affine blends the fill into the border and uses another cubic). The
# randomness comes from the torch RNG, which SeededDataset seeds per sample, drawn in
# timm's order: the ops, then per op its p, magnitude, sign and resampling.
RA_FILL = 128  # timm's grey fill (128, 128, 128) for the geometric ops


def pil_grayscale(x):
    """uint8 3xHxW -> int32 1xHxW luma as PIL's convert("L"): ITU-R 601-2 in 16-bit fixed point, rounded."""
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
    """ImageOps.autocontrast: each channel's [lo, hi] stretched to [0, 255] by PIL's table,
    int(i * scale + offset), scale = 255 / (hi - lo), offset = -lo * scale, in Python floats (float64,
    as PIL: torch's scalar / tensor is a reciprocal and a product, off by one ulp); a flat channel is
    left alone."""
    tables = []
    for lo, hi in zip(x.amin((-2, -1)).tolist(), x.amax((-2, -1)).tolist()):
        if hi <= lo:
            tables.append(torch.arange(256, dtype=torch.float64))
            continue
        scale = 255.0 / (hi - lo)
        tables.append((torch.arange(256, dtype=torch.float64) * scale + -lo * scale).trunc().clamp(0, 255))
    return torch.stack(tables).to(torch.uint8).gather(1, x.flatten(-2).long()).view_as(x)


def solarize_add(x, addition, threshold=128):
    """timm's solarize_add: pixels below the threshold get `addition` more, clipped to 255."""
    return torch.where(x < threshold, (x.int() + addition).clamp(max=255).to(torch.uint8), x)


PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def pil_geometric(x, transform):
    """A geometric op done by PIL itself, as timm does (and as GaussianBlur here): uint8 3xHxW -> PIL
    image -> transform(image) -> uint8 3xHxW. torchvision's affine differs from PIL's in the border
    pixels (it blends the fill in), the bicubic kernel (a = -0.75, PIL's -1) and rounding; calling
    PIL is exact and about 4x faster than a tensor resampler that matches it to the bit."""
    image = transform(Image.fromarray(x.permute(1, 2, 0).numpy()))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def pil_affine(x, matrix, resample, fill=RA_FILL):
    """PIL's Image.transform(size, AFFINE, matrix, resample, fillcolor=grey): output pixel (x, y), in
    pixel-edge coordinates, samples the input at (a x + b y + c, d x + e y + f), so a shear turns
    about the top-left corner, as in timm."""
    return pil_geometric(x, lambda image: image.transform(image.size, Image.AFFINE, matrix, PIL_RESAMPLE[resample],
                                                          fillcolor=(fill,) * 3))


def pil_rotate(x, degrees, resample, fill=RA_FILL):
    """PIL's Image.rotate(degrees, resample, fillcolor=grey): counter-clockwise about the centre."""
    return pil_geometric(x, lambda image: image.rotate(degrees, resample=PIL_RESAMPLE[resample], fillcolor=(fill,) * 3))


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
    if name == "AutoContrast":
        return pil_autocontrast(x)
    if name == "Equalize":
        return v2.functional.equalize(x)
    if name == "Invert":
        return v2.functional.invert(x)
    if name == "Posterize":  # 0 bits (level < 0.25: m is 15 standard deviations below 10) give black
        return v2.functional.posterize(x, argument)
    if name == "Solarize":  # inverts the pixels >= threshold: none at 256
        return x if argument > 255 else v2.functional.solarize(x, argument)
    if name == "SolarizeAdd":
        return solarize_add(x, argument)
    if name == "Color":
        return pil_color(x, argument)
    if name == "Contrast":
        return pil_contrast(x, argument)
    if name == "Brightness":
        return v2.functional.adjust_brightness(x, argument)
    if name == "Sharpness":  # PIL's SMOOTH kernel, border pixels kept
        return v2.functional.adjust_sharpness(x, argument)
    if name == "Rotate":
        return pil_rotate(x, argument, resample)
    matrix = {"ShearX": (1, argument, 0, 0, 1, 0), "ShearY": (1, 0, 0, argument, 1, 0),
              "TranslateXRel": (1, 0, argument * width, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, argument * height)}[name]
    return pil_affine(x, matrix, resample)


class RandAugment(torch.nn.Module):
    """timm's RandAugment "rand-m10-n2-mstd0.5" (the asymmetry paper's StrongerAug) on uint8 3xHxW.

    num_ops ops drawn uniformly with replacement from RA_OPS; each applied with probability p at
    magnitude m ~ N(magnitude, magnitude_std) clipped to [0, 10]; geometric ops fill with grey
    128 and resample bilinear or bicubic at random. About a quarter of the images pass unchanged
    (each op is skipped with p 0.5, and Solarize at m 10 inverts nothing)."""

    def __init__(self, num_ops=2, magnitude=10.0, magnitude_std=0.5, p=0.5):
        super().__init__()
        self.num_ops, self.magnitude, self.magnitude_std, self.p = num_ops, magnitude, magnitude_std, p

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

    def extra_repr(self):
        return f"num_ops={self.num_ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, p={self.p}"


def random_resized_crop(size, scale, interpolation):
    """RandomResizedCrop resampling with interpolation "bilinear" or "bicubic" (antialiased when shrinking)."""
    return v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode(interpolation), antialias=True)


def view_transform(recipe, size, scale=None, randaugment=False, device_aug=False, interpolation="bilinear"):
    """One augmented view of a uint8 CxHxW image -> normalised float CxSxS.

    recipe: a RECIPES name, or "weaker" (WeakerAug: RandomResizedCrop(0.08, 1) + flip only).
    randaugment: StrongerAug = the recipe + RandAugment (timm's rand-m10-n2-mstd0.5) after the flip.
    scale: overrides the recipe's crop scale range (MultiCrop: (0.14, 1) and (0.05, 0.14)).
    device_aug (--gpu-aug): -> (uint8 CxSxS, parameters) for finish_views; see DeviceAugView.
    interpolation: the crop's resampling, "bilinear" or "bicubic" (FRAMEWORK_INTERPOLATION).
    """
    if device_aug and not randaugment and recipe != "weaker":
        return DeviceAugView(recipe, size, scale, interpolation)
    if recipe == "weaker":
        scale = scale or (0.08, 1.0)
        ops = [random_resized_crop(size, scale, interpolation), v2.RandomHorizontalFlip()]
    else:
        default_min, jitter, blur_p, solarize_p = RECIPES[recipe]
        scale = scale or (default_min, 1.0)
        ops = [
            random_resized_crop(size, scale, interpolation),
            v2.RandomApply([v2.ColorJitter(*jitter)], p=JITTER_P),
            v2.RandomGrayscale(p=GRAY_P),
        ]
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
    """Center view for kNN and probes: resize to size/0.875 and center-crop (ImageNet: 256 -> 224);
    images of 64 px and less are used whole (resize shorter side to size, center-crop)."""
    resize = size if size <= 64 else round(size * 256 / 224)
    return v2.Compose([
        v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ---------------------------------------------------------------------------------------------
# ScaleMix (source): mix two views of one image by a box of random scale
# ---------------------------------------------------------------------------------------------
# +-----------------------------------------------------------------------------------------+
# | ScaleMix raises the source's variance: a box of the second view, of random size and     |
# | position, pastes a differently scaled crop into the first. It yields one standard-size |
# | view and, unlike CutMix, mixes no labels (there are none).                              |
# +-----------------------------------------------------------------------------------------+
def scalemix_box(height, width, lam, center_y, center_x):
    """Box (top, bottom, left, right) of sides sqrt(1-lam)*(H, W) around (center_y, center_x),
    clipped to the image. Heights go with rows, widths with columns (the official code swaps them)."""
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


# ---------------------------------------------------------------------------------------------
# --gpu-aug: the photometric half of each view, batched on the device
# ---------------------------------------------------------------------------------------------
# A view is geometry (crop, flip: needs the decoded image) then colour (jitter, grayscale, blur,
# solarize: per pixel or local). With --gpu-aug a data worker does the geometry and draws every
# random parameter, with the very draws of the CPU recipe, and finish_views applies the colour
# to the whole batch on the device. The views per image, their seeds and their statistics are
# the CPU path's; pixel values differ by the CPU path's rounding to uint8 after each operation,
# and the blur is a 13-tap Gaussian (3 sigma at sigma 2) instead of PIL's box approximation.
# The worker may flip before the colour: per-pixel operations and a symmetric blur commute with
# it. StrongerAug's RandAugment (after the colour, on uint8 images) stays on the worker.
PARAMS = ("jitter", "brightness", "contrast", "saturation", "hue",
          "order0", "order1", "order2", "order3", "gray", "sigma", "solarize")
IDENTITY_PARAMS = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0)
BLUR_TAPS = 13


class DeviceAugView:
    """The worker's half of a recipe view: uint8 image -> (cropped, flipped uint8 CxSxS, the
    photometric parameters PARAMS as a float tensor), drawing the random numbers in the order and
    number of view_transform's pipeline (RandomApply and the _RandomApply transforms draw
    torch.rand(1) against p; ColorJitter draws its order and factors itself)."""

    def __init__(self, recipe, size, scale=None, interpolation="bilinear"):
        default_min, jitter, self.blur_p, self.solarize_p = RECIPES[recipe]
        self.crop = random_resized_crop(size, scale or (default_min, 1.0), interpolation)
        self.jitter = v2.ColorJitter(*jitter)
        self.blur_p = self.blur_p if blur_kernel(size) else 0.0  # as view_transform: no blur below 64 px
        self.flip = v2.RandomHorizontalFlip()

    def __call__(self, image):
        view = self.crop(image)
        p = dict(zip(PARAMS, IDENTITY_PARAMS))
        if torch.rand(1) < JITTER_P:
            jitter = self.jitter.make_params([])
            p.update({name: jitter[name + "_factor"] for name in ("brightness", "contrast", "saturation", "hue")
                      if jitter[name + "_factor"] is not None}, jitter=1.0)  # a None factor: the identity
            p.update({f"order{i}": float(op) for i, op in enumerate(jitter["fn_idx"])})
        p["gray"] = float(torch.rand(1) < GRAY_P)
        if self.blur_p > 0 and torch.rand(1) < self.blur_p:
            p["sigma"] = torch.empty(1).uniform_(0.1, 2.0).item()  # GaussianBlur's draw
        if self.solarize_p > 0:
            p["solarize"] = float(torch.rand(1) < self.solarize_p)
        return self.flip(view), torch.tensor([p[name] for name in PARAMS])


class FinishedOnWorker:
    """A view the worker finishes itself (WeakerAug, StrongerAug) -> (uint8 view, identity parameters)."""

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
    hue = torch.where(value == r, (g - b) / c, torch.where(value == g, 2 + (b - r) / c, 4 + (r - g) / c))
    hue = (torch.where(chroma > 0, hue, 0.0) / 6 + shift.view(-1, 1, 1)) % 1.0
    # back to RGB: channel = value - value * saturation * clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6, n = 5, 3, 1
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # made on the device: no copy
    k = (n + 6 * hue.unsqueeze(1)) % 6
    return value.unsqueeze(1) - (value * saturation).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x, sigma):
    """Nx3xHxW, sigma N -> each image blurred by its own separable BLUR_TAPS-tap Gaussian (reflect
    padding, as torchvision's gaussian_blur); one grouped convolution per axis for the whole batch."""
    n, c, h, w = x.shape
    t = torch.arange(BLUR_TAPS, device=x.device, dtype=x.dtype) - BLUR_TAPS // 2
    kernel = torch.exp(-0.5 * (t / sigma.clamp(min=1e-6).unsqueeze(1)) ** 2)  # N x taps
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C) x taps: one per channel
    y = F.pad(x.reshape(1, n * c, h, w), [BLUR_TAPS // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, BLUR_TAPS), groups=n * c)  # along rows
    y = F.conv2d(y, kernel.view(n * c, 1, BLUR_TAPS, 1), groups=n * c)  # along columns
    return y.view(n, c, h, w)


def photometric(x, params):
    """Nx3xHxW floats in [0, 1] and NxP parameters (PARAMS) -> the views after ColorJitter (its four
    operations in each image's own order), RandomGrayscale, GaussianBlur and RandomSolarize.
    Every operation runs on the whole batch and is kept where its image drew it (torch.where):
    no data-dependent shapes, so no host-device synchronisation."""
    p = dict(zip(PARAMS, params.to(x.dtype).unbind(1)))
    selected = {name: (p[name] > 0).view(-1, 1, 1, 1) for name in ("jitter", "gray", "sigma", "solarize")}
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
    """ScaleMix on a batch: NxCxHxW views x1, x2 and N boxes (top, bottom, left, right) -> x1 with
    each box taken from x2 (scalemix, batched)."""
    rows = torch.arange(x1.shape[-2], device=x1.device).view(1, -1, 1)
    cols = torch.arange(x1.shape[-1], device=x1.device).view(1, 1, -1)
    top, bottom, left, right = (b.view(-1, 1, 1) for b in boxes.unbind(1))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return torch.where(inside.unsqueeze(1), x2, x1)


@functools.lru_cache(maxsize=None)
def imagenet_mean_std(device):
    """1x3x1x1 ImageNet mean and std on `device`, made once: a copy from the host every step would
    make the host wait for the GPU's queue."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


def finish_views(batch):
    """The device's half of --gpu-aug: uint8 views -> photometric (with the workers' parameters),
    float, ImageNet normalisation, ScaleMix's boxes. Views that arrive finished (float: no
    --gpu-aug) pass through unchanged, so the training loop calls this either way."""
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


# ---------------------------------------------------------------------------------------------
# Views: the source views and the target views of one image
# ---------------------------------------------------------------------------------------------
class Views:
    """Image -> {"source": n_s x 3xSxS, "target": n_t x 3xSxS, and where MultiCrop is placed,
    "source_small" / "target_small": m x 3xsxs}.

    framework: which recipe pair is the "default" augmentation (FRAMEWORK_RECIPES), and the crops'
    interpolation (FRAMEWORK_INTERPOLATION).
    source_aug / target_aug: "weaker" | "default" | "stronger" (AsymAug = stronger/weaker).
    n_source / n_target: standard views per encoder (MeanEnc averages the n_t target encodings).
    multicrop: m small crops, placed on multicrop_on ("source" | "target" | "both"); they take the
    framework's default recipe whatever source_aug / target_aug are, and the standard crops (not
    WeakerAug's) then start at scale 0.14.
    scalemix_on: None | "source" | "target" | "both": those standard views are ScaleMix views.
    crop_min: the recipes' RandomResizedCrop min scale for the standard views, where it differs
    (MoCo v3's ResNet: 0.2); WeakerAug and MultiCrop keep their own.
    device_aug (--gpu-aug): views stay uint8 before their colour operations, and each kind k comes
    with "k_params" (the parameters, PARAMS) and, for ScaleMix, both views of each pair and "k_box";
    finish_views completes them on the device.
    """

    def __init__(self, size, framework="mocov2", source_aug="default", target_aug="default",
                 n_source=1, n_target=1, multicrop=0, multicrop_on="source", scalemix_on=None, crop_min=None,
                 device_aug=False):
        self.n_source, self.n_target, self.scalemix_on = n_source, n_target, scalemix_on
        self.multicrop, self.multicrop_on, self.device_aug = multicrop, multicrop_on, device_aug
        self.interpolation = FRAMEWORK_INTERPOLATION[framework]
        self.recipes = {}  # kind -> (recipe, view size, crop scale or None for the recipe's own, StrongerAug)
        for encoder, aug, default in zip(("source", "target"), (source_aug, target_aug), FRAMEWORK_RECIPES[framework]):
            recipe = "weaker" if aug == "weaker" else default
            standard_scale = None  # the recipe's own; WeakerAug keeps (0.08, 1) with or without MultiCrop
            if recipe != "weaker" and (multicrop or crop_min):  # MultiCrop: the small crops get the smallest scales
                standard_scale = (MULTICROP_SCALE[1] if multicrop else crop_min, 1.0)
            self.recipes[encoder] = (recipe, size, standard_scale, aug == "stronger")
            # MultiCrop's small crops: the framework's default recipe (the official augmentation_mini)
            # whatever the encoder's: no RandAugment under StrongerAug, the colour ops under WeakerAug
            self.recipes[encoder + "_small"] = (default, small_crop_size(size), MULTICROP_SCALE, False)
        self.transforms = {kind: view_transform(recipe, size, scale, stronger, device_aug, self.interpolation)
                           for kind, (recipe, size, scale, stronger) in self.recipes.items()}

    def counts(self):
        """kind -> views of that kind per image."""
        counts = {"source": self.n_source, "target": self.n_target}
        counts.update({encoder + "_small": self.multicrop for encoder in ("source", "target")
                       if self.multicrop and self.multicrop_on in (encoder, "both")})
        return counts

    def _views(self, kind, image, n):
        """n views of one kind -> {kind: n x 3xSxS} (and, with device_aug, {kind + "_params": n x P})."""
        t = self.transforms[kind]
        mix = kind in ("source", "target") and self.scalemix_on in (kind, "both")
        if not self.device_aug:
            return {kind: torch.stack([scalemix(t(image), t(image)) if mix else t(image) for _ in range(n)])}
        views, params, boxes = [[], []], [[], []], []
        for _ in range(n):  # the draws of the CPU path, in its order: view 1, view 2, then the box
            for pair in range(1 + mix):
                view, p = t(image)
                views[pair].append(view)
                params[pair].append(p)
            if mix:
                boxes.append(torch.tensor(random_scalemix_box(*views[0][-1].shape[-2:])))
        out = {kind: torch.stack(views[0] + views[1]), kind + "_params": torch.stack(params[0] + params[1])}
        if mix:  # all first views, then all second views: finish_views pastes boxes from the second half
            out[kind + "_box"] = torch.stack(boxes)
        return out

    def __call__(self, image):
        image = v2.functional.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        return {k: v for kind, n in self.counts().items() for k, v in self._views(kind, image, n).items()}


def collate_views(samples):
    """[(views, label)] -> ({kind: (n*B)x3xHxW}, labels B). View-major: rows i*B..(i+1)*B-1 are
    view i of every image, so equal-resolution views run in one forward and chunk(n) splits them."""
    kinds = samples[0][0].keys()
    batch = {k: torch.stack([views[k] for views, _ in samples], dim=1).flatten(0, 1) for k in kinds}
    return batch, torch.tensor([label for _, label in samples])


# ---------------------------------------------------------------------------------------------
# The paper's variance reference (Fig. 2): how much the encodings of one image spread over its views
# ---------------------------------------------------------------------------------------------
# variance.py (a checkpoint, any design) and the scripts' variance monitor (asymmetry_variance:
# the run's own source and target, while it trains) both measure it with these.
def intra_sample_variance(z):
    """K x N x D encodings of N images (K each) -> N: the variance over the K l2-normalised
    encodings (population, /K), averaged over the D dimensions = (1 - ||mean||^2) / D."""
    return F.normalize(z.float(), dim=-1).var(0, unbiased=False).mean(-1)


def uniform_reference(k, d):
    """The variance of K encodings drawn uniformly on the sphere in d dimensions: E||mean of K unit
    vectors||^2 = 1/K, so (1 - 1/K)/d (1/d only as K grows)."""
    return (1 - 1 / k) / d


class Draws(torch.utils.data.Dataset):
    """Item i * r + j: image i of `base` (with its label) for the j-th of r draws of its views.
    Wrapped in a SeededDataset, each draw is seeded by its own item: the same views at every pass
    (the variance monitor's probe set: a change over training is the encoder's, not the views')."""

    def __init__(self, base, r):
        self.base, self.r = base, r

    def __len__(self):
        return len(self.base) * self.r

    def __getitem__(self, item):
        return self.base[item // self.r]


class Replay:
    """A loader whose batches are the same at every pass (seeded views of fixed images): after a
    first pass whose views fit in max_bytes, later passes replay them without decoding or
    augmenting again (the variance monitor's probe at 32 px: about 50 MB); a larger one is loaded
    again at every pass."""

    def __init__(self, loader, max_bytes=256 * 2**20):
        self.loader, self.max_bytes, self.batches = loader, max_bytes, None

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        kept, size = [], 0
        for batch in self.loader:
            size += sum(x.numel() * x.element_size() for x in batch[0].values())
            if size <= self.max_bytes:
                kept.append(batch)
            yield batch
        if size <= self.max_bytes:  # a whole pass, and it fits
            self.batches = kept


# ---------------------------------------------------------------------------------------------
# Data sets: ImageFolder roots, torchvision names, and a built-in synthetic one
# ---------------------------------------------------------------------------------------------
class InputError(ValueError):
    """Bad user input (data, sizes, checkpoint): reported as one line before work starts."""


_warned = set()


def warn(message):
    """One line 'warning: ...' on stderr, once per message and process, from rank 0 only where
    torch.distributed runs."""
    if message in _warned or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    _warned.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_weights(path):
    """torch.load(path, weights_only=True) onto the CPU. A file it cannot or will not read raises
    InputError in one line: for a refused pickle, the first object that is not a tensor or a plain
    container (e.g. GLOBAL posix.system) and what to do, instead of torch's advice."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))  # torch bolds part of its message
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            raise InputError(
                f"cannot load {path}: it holds objects other than tensors and plain containers (the first: "
                f"{refused.group(1)}), which torch.load(weights_only=True) refuses to unpickle; if you trust the file, "
                f"load it once with weights_only=False and re-save only its tensors, e.g. "
                f"torch.save(checkpoint['state_dict'], 'weights.pth')") from None
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = reason.group(1) if reason else next((line for line in text.splitlines() if line.strip()), "")
        raise InputError(f"cannot read {path}: {type(e).__name__}: {' '.join(reason.split())[:200]}") from None


def load_rgb(path):
    """Any PIL-readable image (grayscale, CMYK, RGBA, palette, 16-bit) -> RGB; errors name the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except Exception as e:  # PIL raises many types for corrupt or truncated files
        raise InputError(f"cannot read image {path}: {e}") from None
    if image.mode in ("RGBA", "LA", "P"):  # composite transparency on white, not on black
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    if image.mode == "I;16" or image.mode == "I":  # 16/32-bit grayscale: scale to 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a (image, label) data set; seeds the augmentation of each sample from (seed, epoch, index).

    The views of an image then do not depend on worker count, world size or batch order, so
    a resumed run sees exactly the views of an uninterrupted one, and 1 process == 2 processes.
    skip_bad (training): an unreadable image is left out and its place taken by the next readable
    one, with a warning; the views stay seeded by the place, so batches keep their size and the run
    stays deterministic. Held-out metrics leave unreadable images out instead (readable()).
    """

    def __init__(self, base, transform, seed=0, skip_bad=False):
        self.base, self.transform, self.seed, self.skip_bad = base, transform, seed, skip_bad
        self.epoch = 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        for offset in range(len(self.base)):
            try:
                image, label = self.base[(index + offset) % len(self.base)]
                break
            except InputError as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"skipping: {e}")
        else:
            raise InputError(f"--skip-bad-images: none of the {len(self.base)} images can be read")
        # seed the global torch RNG (which the v2 transforms draw from) for this sample only;
        # restore it after, so that a loader without workers leaves the caller's stream alone
        state = torch.get_rng_state()
        torch.random.default_generator.manual_seed(
            ((self.seed * 1_000_003 + self.epoch) * len(self.base) + index) % 2**63)
        views = self.transform(image)
        torch.set_rng_state(state)
        return views, label


class LoadCheck(torch.utils.data.Dataset):
    """Item i: (indices[i], None) when base[indices[i]] loads, else (indices[i], the reason).
    header_only (ImageFiles): only PIL's parse of the file's header and verify(), no decode."""

    def __init__(self, base, indices, header_only=False):
        self.base, self.indices, self.header_only = base, indices, header_only

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        try:
            if self.header_only:
                path = self.base.samples[self.indices[i]][0]
                try:
                    with Image.open(path) as image:
                        image.verify()
                except Exception as e:
                    raise InputError(f"cannot read image {path}: {e}") from None
            else:
                self.base[self.indices[i]]
            return self.indices[i], None
        except Exception as e:  # InputError from load_rgb; PIL's own errors from torchvision data sets
            return self.indices[i], " ".join(str(e).split()) or type(e).__name__


def readable(base, indices=None, workers=0, what="images"):
    """--skip-bad-images for held-out metrics: -> the indices (of `indices`, default all) whose image
    loads, in order, and how many do not. Each image is read once before any work (by `workers`
    processes), so that a metric counts every readable image once; one warning line names the first
    unreadable one."""
    indices = list(range(len(base))) if indices is None else list(indices)
    loader = torch.utils.data.DataLoader(LoadCheck(base, indices), batch_size=16, num_workers=workers,
                                         collate_fn=list)
    kept, bad = [], []  # indices that load; reasons of those that do not
    for batch in loader:
        for index, reason in batch:
            if reason is None:
                kept.append(index)
            else:
                bad.append(reason)
    if bad:
        warn(f"--skip-bad-images: {len(bad)} of {len(indices)} {what} cannot be read and are left out "
             f"(the first: {bad[0]})")
    if not kept:
        raise InputError(f"--skip-bad-images: none of the {len(indices)} {what} can be read (the first: {bad[0]})")
    return kept, len(bad)


def cache_dir():
    """Where answers that depend only on files on disk are kept: $XDG_CACHE_HOME (~/.cache)/asym-siam."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "asym-siam")


def unreadable(base, indices, header_only, workers):
    """[(index, reason)] of the images of `indices` that cannot be read (LoadCheck, by `workers`
    processes), cached: the answer is kept under a key of the files' paths, sizes and modification
    times, so an unchanged data set is not read again."""
    files = [base.samples[i][0] for i in indices]
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) if os.path.exists(f) else (f,) for f in files]
    key = hashlib.sha1(repr(("header" if header_only else "decode", stats)).encode()).hexdigest()
    path = os.path.join(cache_dir(), f"unreadable-{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return [tuple(row) for row in json.load(f)]
    loader = torch.utils.data.DataLoader(LoadCheck(base, indices, header_only), batch_size=64, num_workers=workers,
                                         collate_fn=list)
    bad = [(index, reason) for batch in loader for index, reason in batch if reason is not None]
    try:  # a cache that cannot be written costs a second check next time, nothing else
        os.makedirs(cache_dir(), exist_ok=True)
        with open(path + f".{os.getpid()}", "w") as f:
            json.dump(bad, f)
        os.replace(path + f".{os.getpid()}", path)
    except OSError:
        pass
    return bad


def check_images(dataset, skip_bad=False, workers=0, group=None, what="images"):
    """Before any work, every image file of `dataset` (a SeededDataset of ImageFiles; others have no
    files) is looked at, so that an unreadable one stops the run now with its name, not hours in:
    a header check (PIL parses the file and verify()s it without decoding). skip_bad
    (--skip-bad-images): every image is decoded instead, and the unreadable ones are left out of
    `dataset`, with one warning line. Each process checks every world-th file; the answers are
    gathered over `group` (all processes take the same decision) and cached per data set."""
    base = dataset.base
    if not hasattr(base, "samples"):
        return
    distributed = torch.distributed.is_initialized()
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
    bad = unreadable(base, list(range(rank, len(base), world)), not skip_bad, workers)
    if world > 1:
        every = [None] * world
        torch.distributed.all_gather_object(every, bad, group=group)
        bad = sorted(row for rows in every for row in rows)
    if not bad:
        return
    if not skip_bad:
        raise InputError(f"{len(bad)} of the {len(base)} {what} cannot be read (the first: {bad[0][1]}); "
                         f"--skip-bad-images leaves them out")
    left_out = {index for index, _ in bad}
    if len(left_out) == len(base):
        raise InputError(f"--skip-bad-images: none of the {len(base)} {what} can be read (the first: {bad[0][1]})")
    warn(f"--skip-bad-images: {len(bad)} of the {len(base)} {what} cannot be read and are left out (the first: {bad[0][1]})")
    dataset.base = torch.utils.data.Subset(base, [i for i in range(len(base)) if i not in left_out])


SYNTHETIC_CLASSES = ("circle", "square", "triangle", "plus", "ring",
                     "star", "stripes", "checker", "crescent", "ell")


class SyntheticShapes(torch.utils.data.Dataset):
    """A built-in, deterministic data set with real class structure: one shape per class
    (SYNTHETIC_CLASSES) of random size, position, rotation and grey level on dark grey noise,
    drawn at 64x64: a network must learn shape to separate the classes. Train 5000, test 1000."""

    def __init__(self, split="train", size=64):
        self.split, self.size = split, size
        self.n = 5000 if split == "train" else 1000
        self.targets = [i % len(SYNTHETIC_CLASSES) for i in range(self.n)]
        self.classes = list(SYNTHETIC_CLASSES)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        label = self.targets[index]
        rng = np.random.default_rng([0 if self.split == "train" else 1, index])
        s = self.size
        # light grey shapes on the same dark grey noise: no colour and no background tells instances
        # apart (with colours, instance discrimination learns colour first and the kNN drops)
        background = np.full(3, 64)
        image = Image.fromarray(np.clip(background + rng.normal(0, 25, (s, s, 3)), 0, 255).astype(np.uint8))
        color = (int(rng.integers(150, 256)),) * 3
        r = rng.uniform(0.3, 0.45) * s  # half-size of the shape: most crops still show part of it
        cx, cy = rng.uniform(r, s - r, 2)
        angle = rng.uniform(0, 2 * math.pi)
        draw = ImageDraw.Draw(image)
        name = SYNTHETIC_CLASSES[label]

        def polygon(points):  # rotate unit-scale points by angle, place at (cx, cy)
            c, si = math.cos(angle), math.sin(angle)
            draw.polygon([(cx + r * (x * c - y * si), cy + r * (x * si + y * c)) for x, y in points], fill=color)

        if name == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif name == "square":
            polygon([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
        elif name == "triangle":
            polygon([(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
        elif name == "plus":
            polygon([(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)])
            polygon([(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)])
        elif name == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            q = 0.55 * r
            draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=tuple(int(b) for b in background))
        elif name == "star":
            polygon([((1.0 if k % 2 == 0 else 0.4) * math.cos(k * math.pi / 5 - math.pi / 2),
                      (1.0 if k % 2 == 0 else 0.4) * math.sin(k * math.pi / 5 - math.pi / 2)) for k in range(10)])
        elif name == "stripes":
            for y in (-0.9, -0.3, 0.3):
                polygon([(-0.9, y), (0.9, y), (0.9, y + 0.35), (-0.9, y + 0.35)])
        elif name == "checker":
            for i in range(3):
                for j in range(3):
                    if (i + j) % 2 == 0:
                        x0, y0 = -0.9 + 0.6 * i, -0.9 + 0.6 * j
                        polygon([(x0, y0), (x0 + 0.6, y0), (x0 + 0.6, y0 + 0.6), (x0, y0 + 0.6)])
        elif name == "crescent":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            dx, dy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
            draw.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=tuple(int(b) for b in background))
        elif name == "ell":
            polygon([(-0.8, -1), (-0.3, -1), (-0.3, 0.5), (0.8, 0.5), (0.8, 1), (-0.8, 1)])
        return image, label


def has_image(folder):
    """Whether `folder` holds an image file at any depth (as ImageFolder reads it); stops at the first."""
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS) and entry.is_file():
                return True
            if entry.is_dir():
                subfolders.append(entry.path)
    return any(has_image(sub) for sub in subfolders)


def folder_classes(root):
    """The class folders of an ImageFolder split that hold an image, sorted. An empty class folder is
    not a class: it is left out with a warning (in train/ it would take an index and shift the others)."""
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    empty = [name for name in names if not has_image(os.path.join(root, name))]
    if empty:
        warn(f"{root}: {len(empty)} empty class folder(s) left out: {', '.join(empty[:5])}"
             + (", ..." if len(empty) > 5 else ""))
    return [name for name in names if name not in empty]


class ImageFiles(torch.utils.data.Dataset):
    """An ImageFolder split (root/<class>/<image>) read with load_rgb.

    classes: the class-to-index map of every split (train/'s class folders, sorted; default: this
    folder's own). A class here that is not in it is an error naming it, since it could not be
    scored; a class of it with no images here is allowed, with a warning."""

    def __init__(self, root, classes=None):
        found = folder_classes(root)
        if not found:
            raise InputError(f"no images found under {root}")
        classes = found if classes is None else list(classes)
        unknown = [name for name in found if name not in classes]
        if unknown:
            raise InputError(f"{root} has class folder(s) that train/ lacks: {', '.join(unknown[:5])}"
                             + (", ..." if len(unknown) > 5 else "") + " (every split is numbered by train/'s classes)")
        absent = [name for name in classes if name not in found]
        if absent:
            warn(f"{root} has no images of {len(absent)} of the {len(classes)} classes: {', '.join(absent[:5])}"
                 + (", ..." if len(absent) > 5 else ""))
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
    """data/split (train, val or test) as ImageFiles numbered by data/train/'s classes, so that a
    label means the same class in every split; a folder without train/ (or with no images in
    it) numbers its own classes."""
    train = os.path.join(data, "train")
    classes = folder_classes(train) if os.path.isdir(train) and split != "train" else []
    return ImageFiles(os.path.join(data, split), classes or None)


TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}


def base_dataset(data, split, data_root="data"):
    """data: "synthetic" | "cifar10" | "cifar100" | "stl10" | an ImageFolder root with train/ and
    val/ (or test/), every split numbered by train/'s classes (folder_split). split: "train"
    (pretraining images), "train_labeled" (labelled training images: the kNN bank; differs from
    "train" for STL-10 only) or "test" (held out)."""
    if data == "synthetic":
        return SyntheticShapes("train" if split.startswith("train") else "test")
    if data in TORCHVISION_SETS:
        cls = getattr(torchvision.datasets, TORCHVISION_SETS[data])
        root = os.path.join(data_root, data)
        if data == "stl10":
            kwargs = {"split": {"train": "train+unlabeled", "train_labeled": "train", "test": "test"}[split]}
        else:
            kwargs = {"train": split.startswith("train")}
        try:
            return cls(root, download=False, **kwargs)
        except RuntimeError:
            pass  # not there yet: try to download
        try:
            return cls(root, download=True, **kwargs)
        except Exception as e:
            raise InputError(f"{data} is not in {root} and could not be downloaded ({type(e).__name__}: {e}); "
                             f"download it elsewhere and copy it to {root}, or pass --data-root") from None
    if not os.path.isdir(data):
        raise InputError(f"--data {data}: no such directory (and not one of synthetic, {', '.join(TORCHVISION_SETS)})")
    names = ["train"] if split.startswith("train") else ["val", "test"]
    for name in names:
        if os.path.isdir(os.path.join(data, name)):
            return folder_split(data, name)
    raise InputError(f"--data {data}: expected an ImageFolder root with a {' or '.join(names)}/ folder")


def dataset(data, split, transform, data_root="data", seed=0, skip_bad=False):
    """base_dataset(data, split) with a per-sample-seeded transform (SeededDataset)."""
    return SeededDataset(base_dataset(data, split, data_root), transform, seed, skip_bad)


# ---------------------------------------------------------------------------------------------
# --data-on-device: a small data set kept on the device, every view made there
# ---------------------------------------------------------------------------------------------
# At 32 px a data worker makes the two views of a few hundred CIFAR images a second
# (benchmarks/dataloader.py), while one GPU's step consumes thousands: MultiCrop's eight views
# leave the GPU waiting even with 16 workers. A small data set fits in the device's memory as
# uint8 (CIFAR-10's 50000 images: 150 MB), and every draw and pixel operation of a view can run
# there on the whole batch: RandomResizedCrop's box (torchvision's ten tries, then its fallback),
# its antialiased bilinear resize (torchvision's filter weights, as two batched matrix products,
# which also flip), and the colour operations of --gpu-aug (photometric) with parameters drawn as
# ColorJitter, RandomGrayscale, GaussianBlur and RandomSolarize draw them. The views are equal in
# distribution to the CPU path's, not image by image: the draws come from a generator on the
# device, seeded per (seed, epoch, batch, process), so a resumed run sees the same views, and a
# different number of processes different ones. StrongerAug's RandAugment stays on the workers.
def random_crop_boxes(n, height, width, scale, generator, ratio=(3 / 4, 4 / 3), tries=10):
    """n boxes (top, left, box height, box width), each as torchvision's RandomResizedCrop draws it:
    up to `tries` draws of an area (scale x the image's) and a log-uniform aspect ratio, the first
    that fits the image, else the centred whole image with its aspect ratio clamped to `ratio`."""
    device = generator.device
    area = height * width * torch.empty(n, tries, device=device).uniform_(*scale, generator=generator)
    aspect = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 where none does: replaced below)
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
    """Crops [offset, offset + length) of an axis of `full` pixels (N each) -> NxSIZExFULL weights
    of torchvision's antialiased resize of each crop to `size` pixels: a triangle ("bilinear") or
    cubic ("bicubic") filter stretched by the scale when shrinking, zero outside the crop."""
    offset, length = offset.to(torch.float32), length.to(torch.float32)
    scale = length / size  # input pixels per output pixel
    support = scale.clamp(min=1.0)
    center = scale[:, None] * (torch.arange(size, device=offset.device) + 0.5)  # NxS, in crop coordinates
    pixel = torch.arange(full, device=offset.device) - offset[:, None]  # NxFULL, in crop coordinates
    distance = (pixel[:, None, :] + 0.5 - center[:, :, None]) / support[:, None, None]
    inside = ((pixel >= 0) & (pixel < length[:, None]))[:, None, :]
    weights = (cubic(distance) if interpolation == "bicubic" else (1 - distance.abs()).clamp(min=0)) * inside
    return weights / weights.sum(2, keepdim=True)


def resized_crops(images, boxes, size, flip, interpolation="bilinear"):
    """Nx3xHxW uint8 images, N boxes (top, left, height, width), N flips -> Nx3xSxS floats in [0, 1]:
    torchvision's resized_crop (antialias) of each image, mirrored where flip, as rows x image x columns
    (a bicubic overshoot clipped to [0, 1], as the uint8 result of the CPU path)."""
    rows = resize_weights(boxes[:, 0], boxes[:, 2], size, images.shape[-2], interpolation)  # NxSxH
    cols = resize_weights(boxes[:, 1], boxes[:, 3], size, images.shape[-1], interpolation)  # NxSxW
    cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)  # a mirrored view reads its columns backwards
    x = images.to(torch.float32) * (1 / 255)
    return (rows[:, None] @ x @ cols.transpose(1, 2)[:, None]).clamp(0, 1)


def random_colour_params(recipe, n, size, generator):
    """n rows of PARAMS drawn as view_transform's recipe draws them: ColorJitter with p JITTER_P (factors
    uniform in [max(0, 1 - s), 1 + s], hue in [-h, h], the four operations in a random order), grayscale
    with p GRAY_P, blur (sigma ~ U(0.1, 2)) with the recipe's p from 64 px up, solarize with its p."""
    _, (brightness, contrast, saturation, hue), blur_p, solarize_p = RECIPES[recipe]
    device = generator.device
    u = torch.rand(n, 9, device=device, generator=generator)
    factors = [max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * u[:, i] for i, s in enumerate((brightness, contrast, saturation))]
    order = torch.rand(n, 4, device=device, generator=generator).argsort(1)  # a uniform permutation per view
    blur = u[:, 6] < (blur_p if blur_kernel(size) else 0.0)
    return torch.stack([(u[:, 3] < JITTER_P).float(), *factors, hue * (2 * u[:, 4] - 1), *order.float().unbind(1),
                        (u[:, 5] < GRAY_P).float(), torch.where(blur, 0.1 + 1.9 * u[:, 7], 0.0),
                        (u[:, 8] < solarize_p).float()], 1)


def random_scalemix_boxes(n, height, width, generator):
    """n ScaleMix boxes (top, bottom, left, right) as random_scalemix_box draws them, on the device."""
    u = torch.rand(3, n, device=generator.device, generator=generator)
    cut = (1 - u[0]).sqrt()
    half_h, half_w = (height * cut).floor().div(2, rounding_mode="floor"), (width * cut).floor().div(2, rounding_mode="floor")
    center_y, center_x = (u[1] * height).floor(), (u[2] * width).floor()
    return torch.stack([(center_y - half_h).clamp(min=0), (center_y + half_h).clamp(max=height),
                        (center_x - half_w).clamp(min=0), (center_x + half_w).clamp(max=width)], 1).long()


class DeviceViews:
    """The views of a Views, made on the device from a batch of its uint8 images:
    __call__(images, index, generator) -> {kind: (n*B)x3xSxS normalised floats}, view-major, the
    kinds, counts and recipes of Views and collate_views. RandAugment (StrongerAug) is not made here."""

    def __init__(self, views):
        if any(stronger for kind, (_, _, _, stronger) in views.recipes.items() if kind in views.counts()):
            raise InputError("--data-on-device makes crops, flips and colour on the device, not StrongerAug's RandAugment "
                             "(--asym-aug, --source-aug/--target-aug stronger): drop one of the two")
        self.counts, self.interpolation = views.counts(), views.interpolation
        self.recipes = {kind: (recipe, size, scale or ((0.08, 1.0) if recipe == "weaker" else (RECIPES[recipe][0], 1.0)))
                        for kind, (recipe, size, scale, _) in views.recipes.items()}  # kind -> (recipe, size, crop scale)
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
    """A SeededDataset's images decoded once into the device's memory (uint8 Nx3xHxW) and its
    Views' recipes as DeviceViews (--data-on-device); batches(...) replaces the DataLoader.
    len() and .epoch are the wrapped set's, for the sampler and the scripts' loop."""

    def __init__(self, train_set, workers=0, device=None):
        self.views = DeviceViews(train_set.transform)  # bad settings fail before any decoding
        self.device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                 else torch.device("cpu"))
        self.seed, self.epoch, self.n = train_set.seed, 0, len(train_set)
        decoded = SeededDataset(train_set.base, v2.functional.pil_to_tensor, skip_bad=train_set.skip_bad)
        images, labels = [], []
        for batch, y in torch.utils.data.DataLoader(decoded, batch_size=256, num_workers=workers, collate_fn=stack_images):
            if not images:
                check_device_memory(batch[0].numel() * len(decoded), self.device)
            elif batch.shape[1:] != images[0].shape[1:]:
                raise InputError(f"--data-on-device needs images of one size: found {shape_text(batch[0])} "
                                 f"after {shape_text(images[0][0])}")
            images.append(batch.to(self.device))
            labels.append(y.to(self.device))
        self.images, self.labels = torch.cat(images), torch.cat(labels)

    def __len__(self):
        return self.n

    def batches(self, indices, batch_size, epoch, first_batch, rank=0):
        """The batches of `indices` (full ones only) -> (views, labels) on the device; batch b of the
        epoch draws from a generator seeded by (seed, epoch, first_batch + b, rank)."""
        order = torch.tensor(indices[:len(indices) // batch_size * batch_size], dtype=torch.long)
        if self.device.type == "cuda":  # one asynchronous copy per epoch
            order = order.pin_memory()
        order = order.to(self.device, non_blocking=True)
        generator = torch.Generator(self.device)
        for b, index in enumerate(order.split(batch_size)):
            generator.manual_seed((((self.seed * 1_000_003 + epoch) * 1_000_033 + first_batch + b) * 4099 + rank) % 2**63)
            yield self.views(self.images, index, generator), self.labels[index]


def shape_text(image):
    return "x".join(map(str, image.shape))


def stack_images(samples):
    """[(uint8 3xHxW, label)] -> (Nx3xHxW, labels N); images of unequal sizes are bad input here."""
    for image, _ in samples[1:]:
        if image.shape != samples[0][0].shape:
            raise InputError(f"--data-on-device needs images of one size: found {shape_text(image)} "
                             f"after {shape_text(samples[0][0])}")
    return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])


def check_device_memory(nbytes, device):
    """--data-on-device keeps at most half of a GPU's memory for the images."""
    if device.type == "cuda" and nbytes > torch.cuda.get_device_properties(device).total_memory / 2:
        raise InputError(f"--data-on-device: the training images take {nbytes / 2**30:.1f} GiB as uint8, more than half "
                         f"of the device's memory; use the data workers (drop --data-on-device)")
