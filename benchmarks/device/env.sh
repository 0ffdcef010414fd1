# Sourced by every script in benchmarks/device/ (through setup.sh): the environment of a run.
# Run from the repository root. Results go to ${OUT:-out}/.

# Safety: multicast (NVLS) must never be created or used on the shared machines. These keep
# NCCL, torch SymmetricMemory, NVSHMEM and weavelm off it. Do not remove or override them.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export WEAVELM_DISABLE_MULTICAST=1

export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
export OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The `weavelm` CLI (it starts its own ranks for --tp N), as a command array so that `timeout`
# can run it: this checkout's, as `weavelm.cli` (weavelm/__init__.py maps cli/ there).
WEAVELM=(python3 -m weavelm.cli.main)

# use_gpus N: check that N is a GPU count this machine has, and show the run only GPUs 0..N-1
# (an existing CUDA_VISIBLE_DEVICES is left as it is).
use_gpus() {
  local n=${1:-} have
  if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
    echo "first argument: the GPU count (a positive integer), got '$n'" >&2
    return 2
  fi
  if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    have=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
    if (( n > have )); then
      echo "$n GPUs asked for, $have present" >&2
      return 2
    fi
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1)))
    export CUDA_VISIBLE_DEVICES
  fi
}

# start_server URL LOG SECONDS SERVE-ARGS...: `weavelm serve SERVE-ARGS` in the background (its
# PID in $server, its output in LOG, stopped by `stop_server` and at exit), then wait until
# URL/health answers; 1 if it exits or is not healthy within SECONDS.
start_server() {
  local url=$1 log=$2 bound=$3 t0
  shift 3
  "${WEAVELM[@]}" serve "$@" > "$log" 2>&1 &
  server=$!
  trap stop_server EXIT
  t0=$(date +%s)
  until python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "$url/health" 2> /dev/null; do
    if ! kill -0 "$server" 2>/dev/null; then
      echo "the server exited:"; tail -20 "$log"; return 1
    fi
    if (( $(date +%s) - t0 > bound )); then
      echo "the server was not healthy within $bound s:"; tail -20 "$log"; return 1
    fi
    sleep 2
  done
  echo "server healthy after $(( $(date +%s) - t0 )) s"
}

stop_server() {
  if [ -n "${server:-}" ] && kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    timeout 60 tail --pid="$server" -f /dev/null || kill -KILL "$server"
  fi
}
