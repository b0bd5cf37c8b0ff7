#!/usr/bin/env bash
# Fashion-MNIST calibration of the study's stages (issue 30 item 1), one process at a time, one thread each.
# Usage: scripts/calibrate_fashion_mnist.sh STEP   (STEP: teacher-none | teacher-guard | recover | subset | kd RECIPE)
# Writes runs/calib/<step>/; results are read by scripts/calibration_numbers.py. Data: data/fashion-mnist
# (guard-fast data prepare-fashion-mnist); the KD recipes are scored on data/fashion-mnist/holdout (never the test split).
set -euo pipefail
PY=".venv/bin/python -m launchers.cli"
RUN="env OMP_NUM_THREADS=1 nice -n 5"
OUT=runs/calib
DATA="--data.dataset=fashion-mnist --data.path=data/fashion-mnist --data.workers=0 --dist.cpu_threads=1 --output.progress=false"
HOLD="--data.dataset=fashion-mnist --data.path=$OUT/fm-holdout --data.workers=0 --dist.cpu_threads=1 --output.progress=false"
W=${WIDTH:-16}; EPOCHS=${EPOCHS:-4}; SEED=${SEED:-0}
TEACHER="--model.arch=resnet18-cifar --model.width=$W"
SQUEEZE="--data.batch_size=128 --data.crop_scale_min=0.5 --optim.name=sgd --optim.lr=0.05 --optim.momentum=0.9
 --optim.weight_decay=5e-4 --optim.epochs=$EPOCHS --optim.warmup_epochs=0.2 --val_every=1 --output.log_every=50"
mkdir -p $OUT/fm-holdout
[ -e $OUT/fm-holdout/train ] || ln -s "$(readlink -f data/fashion-mnist/train)" $OUT/fm-holdout/train
[ -e $OUT/fm-holdout/val ] || ln -s "$(readlink -f data/fashion-mnist/holdout)" $OUT/fm-holdout/val
T=$OUT/teacher-none-w$W-e$EPOCHS/teacher.pt
case "$1" in
  teacher-none|teacher-guard)
    obj=${1#teacher-}
    extra=""; [ "$obj" = guard ] && extra="--objective.h_scaling=resolution --objective.h=${H:-3} --objective.beta=${BETA:-0.01}"
    $RUN $PY squeeze $DATA $TEACHER $SQUEEZE --dist.seed=$SEED --objective.name=$obj $extra \
      --output.dir=$OUT/teacher-$obj-w$W-e$EPOCHS${TAG:-} ;;
  recover)  # SRe2L small-data recover: no random crop (crop_scale_min 1), jitter 4 px, flips
    $RUN $PY recover $DATA $TEACHER --model.checkpoint=$T --ipc=10 --iterations=${ITERS:-1000} --lr=0.1 \
      --r_bn=${RBN:-0.01} --jitter=4 --crop_scale_min=1.0 --batch_size=100 --dist.seed=$SEED \
      --output.dir=$OUT/recover-w$W-it${ITERS:-1000}-rbn${RBN:-0.01} ;;
  top1)  # top1 FOLDER: the teacher's top-1 on a recovered set (the recovered_min gate's measurement)
    $RUN .venv/bin/python -c "
import json, sys, torch
from pathlib import Path
from guard_fast.data.presets import resolve_dataset
from guard_fast.data.synthetic import load_synthetic
from guard_fast.models import ModelConfig, model_from_config
from guard_fast.runtime.config import DataConfig, from_dict
folder = Path('$2'); stage = json.loads((folder / 'config.json').read_text())
spec = resolve_dataset(from_dict(DataConfig, stage['data']))
model = model_from_config(from_dict(ModelConfig, stage['model']), spec).eval()
s = load_synthetic(folder, spec.num_classes)
with torch.no_grad():
    pred = model(s.train_pixels(quantize=True)).argmax(1)
print(f'{folder}: teacher top-1 on its recovered images {(pred == s.labels).float().mean():.4f}',
      'per class', (pred == s.labels).view(10, -1).float().mean(1).tolist())" ;;
  subset)  # relabelled REAL IPC 10: the study's real arm (sre2l:images=real), seed $SEED
    $RUN .venv/bin/python -c "
from guard_fast.distill.subset import SubsetConfig, run_subset
from guard_fast.runtime.config import load_config
from guard_fast.runtime.distributed import DistInfo
import torch
cfg = load_config(SubsetConfig, None, '$DATA --ipc=10 --dist.seed=$SEED --output.dir=$OUT/subset-ipc10-s$SEED'.split())
print(run_subset(cfg, DistInfo(rank=0, world=1, local_rank=0, device=torch.device('cpu'))))" ;;
  kd)  # kd RECIPE: name crop cutmix epochs (batch 50: steps = 2 x epochs); student width SW (default 8)
    name=$2; crop=$3; cutmix=$4; ep=$5; SW=${SW:-8}; IMG=${IMAGES:-$OUT/subset-ipc10-s$SEED}
    V="--views.batch_size=50 --views.crop_scale_min=$crop --views.cutmix_alpha=$cutmix"
    $RUN $PY relabel $HOLD $TEACHER --model.checkpoint=$T --images=$IMG $V --epochs=$ep \
      --output.dir=$OUT/kd-$name/relabel
    $RUN $PY train $HOLD --model.arch=resnet18-cifar --model.width=$SW --images=$IMG --labels=$OUT/kd-$name/relabel \
      $V --optim.name=adamw --optim.lr=1e-3 --optim.weight_decay=0.01 --optim.epochs=$ep --temperature=20 \
      --output.log_every=50 --output.dir=$OUT/kd-$name/train ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
