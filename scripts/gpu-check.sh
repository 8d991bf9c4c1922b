#!/bin/bash
# ferry's NVML paths on a real GPU, by hand (not part of CI: CI machines have
# no GPU). Needs python3 and the NVIDIA driver (libcuda.so.1); no CRIU: /bin/true
# stands in, since the GPU gate refuses before CRIU is started.
# Usage: FERRY=path/to/ferry scripts/gpu-check.sh
B=${FERRY:-target/release/ferry}
OUT=${OUT:-$(mktemp -d)}
echo "== host"; uname -r; ldd --version | head -1; nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version,mig.mode.current --format=csv
echo "== ferry check --gpu (no CUDA process)"; $B check --gpu; $B check --gpu --json > $OUT/check-gpu-idle.json; echo rc=$?
echo "== a CUDA context with 256 MiB allocated (python ctypes on libcuda)"
rm -f /tmp/cuda.ready
python3 - <<'PY' &
import ctypes, time, os
cu = ctypes.CDLL("libcuda.so.1")
print("cuInit", cu.cuInit(0), flush=True)
d = ctypes.c_int(); cu.cuDeviceGet(ctypes.byref(d), 0)
ctx = ctypes.c_void_p(); print("cuCtxCreate", cu.cuCtxCreate_v2(ctypes.byref(ctx), 0, d), flush=True)
p = ctypes.c_void_p(); print("cuMemAlloc", cu.cuMemAlloc_v2(ctypes.byref(p), 256 << 20), flush=True)
open("/tmp/cuda.ready", "w").write(str(os.getpid()))
time.sleep(90)
PY
for i in $(seq 100); do [ -s /tmp/cuda.ready ] && break; sleep 0.2; done
P=$(cat /tmp/cuda.ready); echo "cuda pid $P"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
echo "== ferry check --gpu (with the CUDA process)"; $B check --gpu; $B check --gpu --json > $OUT/check-gpu-busy.json
echo "== ferry dump of the CUDA process (must refuse before CRIU; CRIU stands in as /bin/true)"
$B dump -t $P -D /tmp/ferry-d1 --criu /bin/true; echo "rc=$?"; ls -la /tmp/ferry-d1 2>&1 | head -3
echo "== same with --ignore-gpu (warns, then reaches CRIU, which is /bin/true here)"
$B dump -t $P -D /tmp/ferry-d2 --criu /bin/true --ignore-gpu; echo "rc=$?"
echo "== the process still runs:"; kill -0 $P && echo alive
kill $P; wait
which cuda-checkpoint criu 2>&1 | head
