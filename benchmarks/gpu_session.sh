#!/bin/sh
# The device run of issue 6 in one call, sized for a 15-minute device budget: at most BUDGET
# seconds (default 480: 8 min), so that the machine's start (1-2 min) and a short second call
# still fit. Run it with the device tool from the repository root: `sh benchmarks/gpu_session.sh`,
# timeout_s 540. Steps run in order of importance; the three-seed study only gets what is left.
#
# Each step has its own time limit and the run goes on past a failed step; every step writes its
# table into $OUT as soon as it ends, so a run cut short still returns what it finished. $OUT
# (the device tool's output folder; at most 8 files come back) gets:
#   maps.md        bench_maps.py, bf16 and fp32/tf32, batch 256 (device, versions, peak memory);
#                  bench_any_model.py after them
#   pipeline.md    bench_pipeline.py: `mnpo evaluate` per method and map precision, training
#                  images/s of the released layout against plain torchvision VGG16, peak memory;
#                  a row of `mnpo evaluate --decode device` (nvJPEG; issue 21) beside the
#                  first method's host-decoded rows; the training rows run end to end through
#                  the training run's own input
#                  pipeline (train_input.training_loader: WORKERS persistent workers, uint8
#                  batches pinned and normalized on the GPU), so they show whether input keeps up
#   study.md/.json study.py at 224 px, full width: parts, then both presets (one training seed;
#                  three if time allows)
#   figure-parts.png, figure-shapes.png   the study's overlays
#   precision.md   check_precision.py on the study's `parts` network (exit 1 if default maps drift)
#   log.txt        versions, every step's stderr and exit status, the study's printed tables
#                  (the methods of issues 14 and 23 on `parts` among them, and issue 24's DeiT-S
#                  TS-CAM, SAT and SCM)
#
# The device image (Python 3.12, torch 2.11, torchvision 0.26) holds OpenCV, numba, pyyaml, tqdm
# and tensorboard, as read on 2026-11-17 (device KINDS.md); mnpo runs from src/ via PYTHONPATH. If
# one is missing there, carry it (`pip install --target deps NAME` here, `carry: ["deps"]`).
# Checked end to end on the CPU at the smoke sizes below with torch 2.11.0 / torchvision 0.26.0,
# the device's versions (2026-11-29; the test suite passes with them too).
set -u
OUT=${OUT:-gpu-out}
# Sizes (defaults: the H200/H100 run); a smoke run on a CPU shrinks them, e.g.
# DEVICE=cpu BATCH=4 IMAGES=8 CLASSES=5 WIDTH=0.0625 TRANSFORMER_WIDTH=0.0625 SIZE=32 PER_CLASS=4 EPOCHS=1 WORKERS=0 \
#   sh benchmarks/gpu_session.sh
DEVICE=${DEVICE:-cuda} BATCH=${BATCH:-256} IMAGES=${IMAGES:-2048} CLASSES=${CLASSES:-1000} WIDTH=${WIDTH:-1.0}
SIZE=${SIZE:-224} PER_CLASS=${PER_CLASS:-100} EPOCHS=${EPOCHS:-30} WORKERS=${WORKERS:-12} TRANSFORMER_WIDTH=${TRANSFORMER_WIDTH:-1.0}
# the study's faithfulness columns, sized for the budget: 20 forwards per test image and row
# (ROAD, whose sparse solves run on the CPU, is left out; deletion / insertion in 8 steps)
FAITHFULNESS=${FAITHFULNESS:-avgdrop,deletion,insertion,pointing} FAITHFULNESS_STEPS=${FAITHFULNESS_STEPS:-8}
mkdir -p "$OUT"
export PYTHONPATH="src:deps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
STUDY=${STUDY:-/tmp/mnpo-study}

START=$(date +%s)
BUDGET=${BUDGET:-480}  # seconds for the whole script: later steps get what earlier ones left

step() {  # step NAME SECONDS STDOUT-FILE COMMAND...: run with a time limit (at most what is left of
    name=$1 limit=$2 target=$3  # BUDGET), append its output to STDOUT-FILE and its stderr to the log
    shift 3
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, $left s of the budget left" >>"$LOG"
        return 1
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    begin=$(date +%s)
    echo "== $name (limit $limit s): $*" >>"$LOG"
    timeout -k 10 "$limit" "$@" >>"$target" 2>>"$LOG"
    status=$?
    echo "== $name: exit $status after $(($(date +%s) - begin)) s" >>"$LOG"
    return $status
}

keep_study() {  # the study's table, numbers and figures into $OUT (the study writes them at its end)
    for f in study.md study.json figure-parts.png figure-shapes.png; do
        if [ -f "$STUDY/$f" ]; then cp "$STUDY/$f" "$OUT/$f"; fi
    done
}

python3 -c "import sys, torch, torchvision, cv2, yaml, tqdm; print('Python', sys.version.split()[0], 'torch', \
torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  >>"$LOG" 2>&1
if python3 -c "import numba" 2>/dev/null; then echo "numba: yes" >>"$LOG"; else echo "numba: no (OpenCV loop)" >>"$LOG"; fi

# (1) maps per method against the released MNPOs recipe, bf16 then fp32/tf32 (about 1 min);
# Score-CAM left out: 1024 forwards per image at full width would take the whole step
MAP_METHODS=cam,mnpo,mnpos,dgl,gradcam,gradcampp,xgradcam,layercam,hirescam,ablationcam,eigencam
rm -f "$OUT/maps.md"
step maps-bf16 60 "$OUT/maps.md" python3 benchmarks/bench_maps.py --device "$DEVICE" --batch "$BATCH" \
  --repeats 5 --width "$WIDTH" --classes "$CLASSES" --bf16 --channels-last --methods "$MAP_METHODS"
echo >>"$OUT/maps.md"
step maps-fp32 60 "$OUT/maps.md" python3 benchmarks/bench_maps.py --device "$DEVICE" --batch "$BATCH" \
  --repeats 5 --width "$WIDTH" --classes "$CLASSES" --channels-last --methods "$MAP_METHODS"
# (1b) any model against pytorch-grad-cam (issue 22): torchvision resnet50, convnext_tiny, vit_b_16,
# swin_t, batch 8 at 224; appended to maps.md. Needs grad-cam, which the device image may lack:
# carry it (`pip install --target deps grad-cam ttach`); without it the step fails and the run goes on
echo >>"$OUT/maps.md"
step any-model 90 "$OUT/maps.md" python3 benchmarks/bench_any_model.py --device "$DEVICE" --batch 8 \
  --repeats 3 --slow-batch 8 --slow-models resnet50,convnext_tiny

# (2) end to end: evaluate per method (mnpos with strict fp32 and with tf32 maps), training MNPO
# vs plain VGG16, peak memory; synthetic 500x375 JPEGs, 1000 classes (about 2 min)
step pipeline 150 "$OUT/pipeline.md" python3 benchmarks/bench_pipeline.py --device "$DEVICE" --images "$IMAGES" \
  --batch "$BATCH" --workers "$WORKERS" --classes "$CLASSES" --width "$WIDTH" --methods cam,mnpo,mnpos \
  --map-precisions fp32,tf32 --decodes host,device --train-steps 30 --data /tmp/mnpo-bench

# (3) the synthetic study, the released layout from scratch, one training seed: `parts` first
# (the preset where CAM should fail), then (4) the precision check on its two-branch network,
# then `shapes` beside it (--resume: finished runs are evaluated again, not trained), then
# seeds 0, 1 and 2 with what is left of the budget. study.py rewrites its table after every
# preset and layout, and keep_study copies it into $OUT after every call.
study() {  # study NAME SECONDS PRESETS SEEDS
    step "$1" "$2" "$LOG" python3 benchmarks/study.py --presets "$3" --train-seeds "$4" --image-size "$SIZE" \
      --classes 8 --train-per-class "$PER_CLASS" --val-per-class 5 --test-per-class 25 --epochs "$EPOCHS" \
      --batch 64 --width "$WIDTH" --workers "$WORKERS" --device "$DEVICE" --out "$STUDY" -q --resume \
      --faithfulness "$FAITHFULNESS" --faithfulness-steps "$FAITHFULNESS_STEPS"
    keep_study
}
study study-parts 150 parts 0

# (4) map drift of tf32 / bf16 / channels-last against strict fp32 on the trained parts network
step precision 45 /dev/null python3 benchmarks/check_precision.py --checkpoint "$STUDY/parts-vgg16-mnpo-seed0/best.pt" \
  --data "$STUDY/parts" --input-size "$SIZE" --methods mnpos,cam --device "$DEVICE" --batch 128 \
  --workers "$WORKERS" --out "$OUT/precision.md"

study study-both 150 parts,shapes 0

# (5) wsolevaluation's methods and baselines on `parts` beside it (issue 14), one seed: HaS, CutMix
# and ADL on the one-branch network, ACoL's and SPG's networks, BAS's and BGC's (issue 23), FSL and the
# center baseline. Its
# table goes to log.txt only ($OUT is at its 8 files), the study's printout.
step study-methods 180 "$LOG" python3 benchmarks/study.py --presets parts --train-seeds 0 --image-size "$SIZE" \
  --classes 8 --train-per-class "$PER_CLASS" --val-per-class 5 --test-per-class 25 --epochs "$EPOCHS" \
  --fsl-epochs $((EPOCHS * 5)) --batch 64 --width "$WIDTH" --workers "$WORKERS" --device "$DEVICE" \
  --models center,vgg16-cam+has,vgg16-cam+cutmix,vgg16-cam+adl,vgg16-acol,vgg16-spg,vgg16-bas,vgg16-bgc,vgg16-cam+fsl \
  --faithfulness "$FAITHFULNESS" --faithfulness-steps "$FAITHFULNESS_STEPS" --out "$STUDY-methods" -q --resume

# (6) the transformer line (issue 24): DeiT-S TS-CAM, SAT and SCM from scratch on `parts`, AdamW, one
# seed (the table goes to log.txt, as (5)'s)
step study-transformers 150 "$LOG" python3 benchmarks/study.py --presets parts --train-seeds 0 --image-size "$SIZE" \
  --classes 8 --train-per-class "$PER_CLASS" --val-per-class 5 --test-per-class 25 --epochs "$EPOCHS" \
  --batch 64 --transformer-width "$TRANSFORMER_WIDTH" --workers "$WORKERS" --device "$DEVICE" \
  --models deit_small-tscam,deit_small-sat,deit_small-tscam+scm \
  --faithfulness "$FAITHFULNESS" --faithfulness-steps "$FAITHFULNESS_STEPS" --out "$STUDY-transformers" -q --resume

study study-seeds012 600 parts,shapes 0,1,2
echo "== done" >>"$LOG"
