# Sourced by the two-GPU device scripts (load_tests/tp_*_h200x2.sh) after they set OUT: NVLink multicast off
# in every process, `step` (a command under a time limit, its output in OUT/NAME.log, its exit status in
# OUT/summary.txt) and the host's description appended to OUT/host.txt.
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
SUMMARY=$OUT/summary.txt

step() { # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
  grep -v -e Warning -e warn "$OUT/$name.log" | tail -40
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total --format=csv
  nvidia-smi topo -m
  nproc
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log -1 --oneline
} >>"$OUT/host.txt" 2>&1
cat "$OUT/host.txt"
