#!/usr/bin/env bash
# The GPU figures that README's "Speed" section still lacks, in one run of a few minutes on one GPU:
#     bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.txt
# Step ratios of each design at 224 px (ResNet-50, bf16), --gpu-aug's device half, and a short real
# run through torchrun with NCCL, AsymBN's SyncBN, MultiCrop and --gpu-aug.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/throughput.py mocov2_asym.py --steps 10 --repeats 3 --warmup 5 \
    --compare "" "--multicrop" "--multicrop --multicrop-per-crop" "--scalemix" "--asym-bn" "--mean-enc 2" \
              "--multicrop --asym-bn --mean-enc 2" "--gpu-aug" "--multicrop --gpu-aug" "--channels-last" "--amp off" \
    -- --arch resnet50 --image-size 224 --batch-size 128
python benchmarks/throughput.py byol_asym.py --steps 10 --repeats 3 --warmup 5 \
    --compare "" "--multicrop" "--mean-enc 2" "--compile" -- --arch resnet50 --image-size 224 --batch-size 128
python benchmarks/dataloader.py --data synthetic --images 1024 --batch-size 128 --workers 0 8 \
    --recipes baseline multicrop --gpu-aug
torchrun --nproc_per_node=1 mocov2_asym.py --arch resnet18 --image-size 64 --batch-size 64 --queue-size 4096 \
    --asym-bn --multicrop --gpu-aug --max-steps 30 --print-freq 10 --knn-every -1 --output-dir /tmp/gpu_check_run
