# %% [markdown]
# # Asymmetry in Siamese learning, seen on a laptop
#
# A walk through "On the Importance of Asymmetry for Siamese Representation Learning" (Wang,
# Fan, Tian, Kihara, Chen, CVPR 2022) in its own order, on the built-in `synthetic` shapes and a
# CPU. Every step calls this project's code: the views of `augment.py`, MoCo v2 from
# `mocov2_asym.py`, the measurements of `variance.py`, the study of
# `benchmarks/placement_study.py`. Nothing is implemented twice.
#
# Run it as a script from the repository root, `python docs/tutorial.py` (about 8 minutes on 2
# CPU cores; `--fast` for a one-minute smoke run), or open it cell by cell as a notebook: it is
# in the percent format that VS Code and Jupyter (with jupytext) read. Its outputs go to
# `runs/tutorial/`; a finished step is not run again (delete the folder to start over).
# [docs/tutorial.md](tutorial.md) shows the outputs of one measured run and what they mean.

# %%
import argparse
import os
import sys

if "__file__" in globals():  # a script: the repository is this file's parent's parent
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
else:  # a notebook: started in docs/ or in the repository root
    ROOT = os.path.dirname(os.getcwd()) if os.path.basename(os.getcwd()) == "docs" else os.getcwd()
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import mocov2_asym  # noqa: E402  (after the path)
import placement_study  # noqa: E402
import plot_logs  # noqa: E402
import variance  # noqa: E402

parser = argparse.ArgumentParser(description="the asymmetry paper's insight in one sitting")
parser.add_argument("--fast", action="store_true", help="tiny sizes: a smoke run of every step")
parser.add_argument("--out", default=os.path.join(ROOT, "runs", "tutorial"), help="outputs")
options, _ = parser.parse_known_args()  # a notebook's kernel adds arguments of its own
OUT = options.out
os.makedirs(OUT, exist_ok=True)


def show(path):
    """A picture: inline in a notebook, its path in a terminal."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
        if get_ipython() is not None:
            return display(Image(path))
    except ImportError:
        pass
    print(f"picture: {path}")


# %% [markdown]
# ## 1. Source and target
#
# A Siamese network learns without labels: two encoders see two augmented *views* of one image,
# and the loss makes their encodings agree. The paper names them by what they do: the
# **source** is updated by the gradient, the **target** gets none (MoCo v2: a momentum copy of
# the source; its encodings are the positives and the queue's negatives).
#
# The insight in three sentences. The variance of an image's encodings over its views differs
# between the two sides, and training is better when the target's is *lower* than the source's.
# So designs that raise the variance belong on the source (MultiCrop, ScaleMix, StrongerAug),
# designs that lower it on the target (WeakerAug, SyncBN in the projector, MeanEnc). Placed the
# other way round they hurt, because a noisier target makes a noisier gradient for the source
# without pointing it anywhere new (Sec. 5).

# %% [markdown]
# ## 2. What each design does to the views
#
# Each row places one design on one side; S and T are the views the source and the target
# encode, s and t MultiCrop's small crops (16 px at 32 px, drawn at scale), "mix" a ScaleMix
# view with its pasted box in red. MeanEnc draws several views and averages their encodings.
# SyncBN changes the batch statistics of the projector, not the views, so it has no row. These
# are the training scripts' own views (`augment.Views`), seeded: the same picture every time.

# %%
variance.main(["--gallery", "--data", "synthetic", "--image-size", "32", "--gallery-images",
               "1" if options.fast else "3", "--output-dir", os.path.join(OUT, "gallery")])
show(os.path.join(OUT, "gallery", "views.png"))

# %% [markdown]
# ## 3. Training, with the variance monitor
#
# MoCo v2 on `synthetic` (5000 images of ten shape classes), ResNet-18 at 32 px, the README's
# quick start, twice: the baseline, and the paper's target-side designs together, SyncBN in the
# target projector and MeanEnc with two views (`--asym-bn --mean-enc 2`; the paper's full
# composition adds MultiCrop on the source, which costs 2.5 times the CPU). While it trains, each
# run logs the kNN top-1 of its backbone and the variance monitor: `v_source` and `v_target`,
# the spread of each side's encodings of 256 held-out images over 8 draws of its own views.

# %%
TRAIN = ["--data", "synthetic", "--arch", "resnet18", "--image-size", "32", "--batch-size", "128",
         "--queue-size", "1024", "--lr", "0.06", "--warmup-epochs", "1", "--ema", "0.99",
         "--bn-splits", "4", "--data-on-device", "--workers", "0"]
TRAIN += (["--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--queue-size", "128",
           "--knn-every", "1", "--variance-images", "32", "--variance-views", "2"] if options.fast
          else ["--epochs", "6", "--knn-every", "2"])
RUNS = {"baseline": [], "--asym-bn --mean-enc 2": ["--asym-bn", "--mean-enc", "2"]}
DIRS = {name: os.path.join(OUT, "asym" if flags else "baseline") for name, flags in RUNS.items()}
for name, flags in RUNS.items():
    mocov2_asym.main(TRAIN + flags + ["--output-dir", DIRS[name]])

# %% [markdown]
# The logs, side by side: at every evaluation the kNN top-1 and both variances. The ratio
# `v_target / v_source` below 1 is the state the paper recommends. Before training (epoch 0)
# source and target are the same random encoder, and only their views and BN differ.

# %%
for name, run in DIRS.items():
    print(f"\n{name}\n| epoch | kNN top-1 | v_source (x1e-4) | v_target (x1e-4) | "
          "v_target / v_source |\n|---|---|---|---|---|")
    log = plot_logs.read_log(run)
    knn = {r["step"]: r["knn_top1"] for r in log if "knn_top1" in r}
    for r in (r for r in log if "v_source" in r):
        print(f"| {r['epoch']:g} | {knn.get(r['step'], float('nan')):.1f} | "
              f"{r['v_source'] * 1e4:.2f} | {r['v_target'] * 1e4:.2f} | {r['v_ratio']:.2f} |")
try:
    plot_logs.draw(list(DIRS.values()), ["knn_top1", "variance"], os.path.join(OUT, "training.png"),
                   x="step", labels=list(DIRS), title="MoCo v2 on synthetic: kNN and variances")
    show(os.path.join(OUT, "training.png"))
except ImportError as e:  # matplotlib is optional: the tables above say the same
    print(e)

# %% [markdown]
# ## 4. Fig. 2: each design's variance on one encoder
#
# The paper's reference measurement: keep one encoder fixed, draw each held-out image r times
# with one design's views, and measure how much its encodings spread. Designs above the
# baseline (red in the picture) raise the variance and belong on the source; those below (blue)
# lower it and belong on the target. Measured on the baseline run's trained source and, as the
# reference to compare with, on the random encoder it started from.

# %%
FIG2 = ["--data", "synthetic", "--workers", "0", "--batch-size", "32", "--syncbn-devices", "4"]
FIG2 += (["--num-images", "32", "--views", "2"] if options.fast
         else ["--num-images", "512", "--views", "8"])
variance.main(FIG2 + ["--checkpoint", DIRS["baseline"], "--output-dir",
                      os.path.join(OUT, "fig2_trained")])
show(os.path.join(OUT, "fig2_trained", "variance.png"))
variance.main(FIG2 + ["--framework", "mocov2", "--arch", "resnet18", "--image-size", "32",
                      "--output-dir", os.path.join(OUT, "fig2_random")])

# %% [markdown]
# ## 5. Sec. 5: why the target should vary less
#
# The paper's argument is about the gradient. For the last linear layer before the encoding z,
# dL/dW takes the target's features through differences between images and the source's
# through each image alone; more variance on the target side makes the gradient noisier while
# its expectation stays. Here it is measured: on the trained checkpoint and one batch of 128
# held-out images, each design placed on the target, the loss gradient for W is computed R = 8
# times, redrawing only the target's views (V_t), only the source's (V_s) or both (V). The last
# columns give what Sec. 5 predicts for V_t and what was measured, beyond twice its standard
# error or within it. (Every placement, source side included, at R = 16:
# [docs/variance.md](variance.md#the-gradient-noise-sec-5).)

# %%
NOISE = ["--checkpoint", DIRS["baseline"], "--grad-noise", "--data", "synthetic",
         "--output-dir", os.path.join(OUT, "grad_noise")]
NOISE += (["--num-images", "8", "--views", "2", "--placements", "baseline", "multicrop:target",
           "meanenc:1,3"] if options.fast else
          ["--views", "8", "--placements", "baseline", "multicrop:target", "scalemix:target",
           "stronger:target", "weaker:target", "syncbn:target", "meanenc:1,3"])
variance.main(NOISE)

# %% [markdown]
# ## 6. Table 1: does the placement matter for accuracy?
#
# Variances are the mechanism; accuracy is the claim. The placement study trains MoCo v2 with
# each design on the source and on the target, three seeds each, 12 epochs, and compares the
# kNN top-1. It also correlates `v_target / v_source` with the accuracy, over all runs and per
# side: the ratio falls below 1 when the target calms down or when the source gets noisier, and
# the paper's claim is about the first. Running it takes hours of CPU (about 3 on 2 cores:
# `python benchmarks/placement_study.py --epochs 12 --meanenc 1,3 3,1`), so here its published
# results are read back, training nothing ([docs/table1.md](table1.md) discusses them). What a
# CPU cannot show is the paper's scale: ImageNet, ResNet-50, 100 to 800 epochs, which need GPUs
# ([docs/designs.md](designs.md) gives a command for every row of the paper's tables).

# %%
STUDY = os.path.join(ROOT, "docs", "table1", "results-12ep.jsonl")
if os.path.exists(STUDY):
    placement_study.main(["--report", STUDY, "--output-dir", os.path.join(OUT, "table1")])
else:
    print(f"no published study at {STUDY}")

# %%
print(f"\nThe tutorial's outputs are in {OUT}:")
for folder, _, files in sorted(os.walk(OUT)):
    shown = [f for f in sorted(files) if f.endswith((".png", ".md"))]
    if shown and "runs" not in os.path.relpath(folder, OUT).split(os.sep):
        print(f"  {os.path.relpath(folder, OUT)}: {', '.join(shown)}")
