# Shared body of the launchers/slurm/*.sbatch templates (sourced, not run): one torchrun agent per node through srun,
# c10d rendezvous on the job's first node, and preemption handling (docs/cluster.md). The agent is `guard-fast
# torchrun` (torchrun's launcher, ending a failed job with one line naming the rank that failed first).
#
#   run_stage COMMAND [ARGS...]   runs `guard-fast COMMAND ARGS...` on every allocated GPU (or CPU process)
#
# Environment knobs (set them in the .sbatch file or export them before sbatch):
#   PROCS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE, else 1)
#   RDZV_PORT        rendezvous port on the first node (default 29500)
#   VENV             the environment's bin folder, holding python (default: .venv/bin of the submit directory)
# The checkout must sit at the same path on every node and output.dir on a filesystem all nodes share.
#
# Preemption: submit with `#SBATCH --signal=B:USR1@180` and `#SBATCH --requeue`. SLURM then signals this batch
# shell 180 s before the time limit; the trap forwards SIGTERM to srun (which passes it to the torchrun agents, which
# pass it to their workers), every rank checkpoints at the same step and exits, and the job is requeued. The
# requeued job runs the same command; stages with a `resume` key get `--resume` (a fresh start when there is no
# checkpoint yet), the others continue from their caches.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?submit with sbatch from the guard_fast checkout}"
VENV=${VENV:-$PWD/.venv/bin}
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RDZV_PORT=${RDZV_PORT:-29500}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# gloo and NCCL pick the interface that the hostname resolves to; on nodes where that is 127.0.0.1 or a slow
# management network, name the fast interface, e.g. export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0

_srun_pid=""
_preempted() {
  echo "guard-fast: pre-timeout signal: checkpointing, then requeueing job $SLURM_JOB_ID" >&2
  [ -n "$_srun_pid" ] && kill -TERM "$_srun_pid" 2>/dev/null || true
  wait "$_srun_pid" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap _preempted USR1

run_stage() {
  local command=$1
  shift
  srun --nodes "$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 \
    "$VENV/python" -m launchers.cli torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$PROCS_PER_NODE" \
      --rdzv_backend c10d --rdzv_endpoint "$HEAD:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
      -m launchers.cli "$command" "$@" &
  _srun_pid=$!
  wait "$_srun_pid"  # returns early when the USR1 trap fires; the trap then waits for the checkpoint
}
