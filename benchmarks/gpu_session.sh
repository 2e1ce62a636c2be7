#!/bin/sh
# The device run of issue 6, prepared to fit one device session (budget: about 10 minutes of
# an H100/H200; run it with the device tool, e.g. `sh benchmarks/gpu_session.sh`, timeout 600).
# It writes markdown tables under $OUT (the device tool's output folder) for BENCHMARKS.md.
#
# The device image has torch, torchvision, OpenCV and Triton but no network: mnpo runs from
# src/ (PYTHONPATH); numba is optional (box metrics fall back to the OpenCV loop, slower);
# pyyaml and tqdm must be importable (carry them, e.g. `pip install --target deps pyyaml tqdm`
# and pass deps in `carry`; they are pure Python).
set -eu
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="src:deps${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, torchvision, cv2, yaml, tqdm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
python -c "import numba" 2>/dev/null && echo "numba: yes" >> "$OUT/env.txt" || echo "numba: no (OpenCV box loop)" >> "$OUT/env.txt"
# (1) maps per method, bf16 and fp32/tf32, vs the released MNPOs recipe
timeout 120 python benchmarks/bench_maps.py --device cuda --batch 256 --repeats 5 --bf16 --channels-last | tee "$OUT/maps-bf16.md"
timeout 120 python benchmarks/bench_maps.py --device cuda --batch 256 --repeats 5 --channels-last | tee "$OUT/maps-fp32.md"
# (2) end to end: mnpo evaluate per method; training images/s, MNPO vs plain VGG16; peak memory
timeout 300 python benchmarks/bench_pipeline.py --device cuda --images 4096 --batch 256 --workers 14 \
  --classes 1000 --methods cam,mnpo,mnpos --train-steps 40 --data /tmp/mnpo-bench | tee "$OUT/pipeline.md"
