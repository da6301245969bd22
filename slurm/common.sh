# PoseBERT on SLURM: every site setting in one place, and the shell functions the job scripts
# share. Sourced by every rendered job script (slurm/*.sbatch) when the job starts, and by
# `posebert slurm submit`, which takes the #SBATCH defaults below (partition, account, GPUs,
# CPUs, time limits, the preemption warning). Edit the defaults here for a site, or override
# any knob from the environment at submit time (sbatch exports the submit environment, so the
# job sees the same values):
#
#     POSEBERT_PARTITION=gpu POSEBERT_ACCOUNT=proj42 posebert slurm submit pretrain ...
#
# Only plain assignments at the top level: sourcing this file must have no side effects.

# --- scheduling: the #SBATCH defaults -------------------------------------------------------
: "${POSEBERT_PARTITION:=}"        # empty: the cluster's default partition
: "${POSEBERT_ACCOUNT:=}"          # empty: the user's default account
: "${POSEBERT_QOS:=}"              # empty: the default QOS
: "${POSEBERT_GPUS_PER_NODE:=8}"   # one rank (srun task) per GPU; 0 on CPU-only clusters
: "${POSEBERT_CPUS_PER_TASK:=8}"   # per rank: the main process + data.num_workers loader workers
: "${POSEBERT_TIME:=24:00:00}"     # pretraining time limit (it requeues itself, see below)
: "${POSEBERT_EVAL_TIME:=04:00:00}"   # retrieval evaluation and fine-tuning
: "${POSEBERT_SHARDS_TIME:=04:00:00}" # one shard-building array task
: "${POSEBERT_SIGNAL_S:=300}"      # SIGUSR1 to the ranks this long before the limit: time for
                                   # one checkpoint (Slurm may deliver it up to 60 s early)
: "${POSEBERT_MAX_RESTARTS:=20}"   # requeues per job (SLURM_RESTART_COUNT) before giving up
: "${POSEBERT_ARRAY_PARALLEL:=0}"  # shard-building tasks running at once (0: no limit)
: "${POSEBERT_SBATCH_EXTRA:=}"     # more #SBATCH options, space-separated, e.g.
                                   # "--constraint=h100 --exclusive --mem=0"

# --- runtime environment: applied by posebert_env when the job starts -----------------------
: "${POSEBERT_MODULES:=}"          # `module load` these first (space-separated)
: "${POSEBERT_TMPDIR:=${SLURM_TMPDIR:-/tmp}}"  # node-local scratch (TMPDIR)
: "${POSEBERT_NCCL_SOCKET_IFNAME:=}"  # NCCL_SOCKET_IFNAME (e.g. ib0); empty: NCCL's choice
: "${POSEBERT_NCCL_IB_HCA:=}"      # NCCL_IB_HCA (e.g. mlx5); empty: NCCL's choice
: "${POSEBERT_NCCL_DEBUG:=WARN}"   # NCCL_DEBUG (INFO when debugging a hang)

POSEBERT_STOPPING=0  # set by the TERM trap: the job is being cancelled, do not requeue

posebert_log() {
    echo "[posebert $(date -u +%Y-%m-%dT%H:%M:%SZ) job ${SLURM_JOB_ID:-none}] $*" >&2
}

posebert_env() {
    # The ranks' environment: modules, NCCL, threads, scratch; no stale rank variables (each
    # srun task is one rank, from SLURM_PROCID: a RANK/WORLD_SIZE exported by the submitting
    # shell would make every task the same rank).
    local m
    for m in $POSEBERT_MODULES; do
        module load "$m" || { posebert_log "module load $m failed"; exit 2; }
    done
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
    export NCCL_DEBUG="$POSEBERT_NCCL_DEBUG"
    [[ -n "$POSEBERT_NCCL_SOCKET_IFNAME" ]] && export NCCL_SOCKET_IFNAME="$POSEBERT_NCCL_SOCKET_IFNAME"
    [[ -n "$POSEBERT_NCCL_IB_HCA" ]] && export NCCL_IB_HCA="$POSEBERT_NCCL_IB_HCA"
    export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
    # Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task; without this a rank
    # and its loader workers would share one core
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
    export PYTHONUNBUFFERED=1
    export TMPDIR="$POSEBERT_TMPDIR"
    trap 'POSEBERT_STOPPING=1; posebert_log "batch shell got SIGTERM (scancel or time limit): waiting for the ranks; no requeue"' TERM
}

posebert_train_splits() {
    # ROOT (a split, ROOT/train, or the ROOT/part-*/train of a shard-building array) ->
    # the comma-separated data.train value
    local root=$1 d
    local splits=()
    if [[ -f "$root/manifest.json" ]]; then echo "$root"; return 0; fi
    if [[ -f "$root/train/manifest.json" ]]; then echo "$root/train"; return 0; fi
    for d in "$root"/part-*/train; do
        [[ -f "$d/manifest.json" ]] && splits+=("$d")
    done
    if (( ${#splits[@]} == 0 )); then
        posebert_log "no training split under $root (ROOT/manifest.json, ROOT/train or ROOT/part-*/train)"
        return 1
    fi
    (IFS=,; echo "${splits[*]}")
}

posebert_run() {
    # Run a command (a job step: srun ...) in the background and wait for it; returns its exit
    # code. Bash runs a trap only after its foreground child returns, hence the background and
    # `wait`; but a trapped signal (posebert_env's TERM) interrupts `wait`, and bash (5.2) can
    # then lose the code of a command that ended meanwhile (`wait` again gave 255, not 75). So
    # a subshell that ignores TERM runs the command (TERM back to the default: the step still
    # gets it) and writes its code to a file, read once the subshell is gone.
    local status code pid
    status=$(mktemp "${TMPDIR:-/tmp}/posebert-exit.XXXXXX") || return 1
    (
        trap '' TERM
        ( trap - TERM; exec "$@" )
        echo $? > "$status"
    ) &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid"  # returns early when a trapped signal arrives: wait again while it runs
    done
    code=$(<"$status")
    rm -f "$status"
    return "${code:-1}"  # empty: the subshell itself was killed (SIGKILL)
}

posebert_stage() {
    # Run one stage: NAME, RANKS, then the arguments of `posebert`. RANKS "all": one srun task
    # per GPU (or --ntasks-per-node) on every node of the job, each one rank; "one": a single
    # task on one node. posebert_run waits for the step, so the TERM trap runs while it
    # finishes. Returns the step's exit code.
    local name=$1 ranks=$2
    shift 2
    local launch=(srun --nodes=1 --ntasks=1)
    [[ "$ranks" == all ]] && launch=(srun --kill-on-bad-exit=1)
    posebert_log "stage $name ($ranks): posebert $*"
    posebert_run "${launch[@]}" "${POSEBERT[@]}" "$@"
}

posebert_finish() {
    # Exit with the ranks' code; 75 (EXIT_REQUEUE: preempted, checkpoint written) requeues the
    # job (array task: JOBID_TASKID) and exits 0 so the job is not marked failed; capped by
    # POSEBERT_MAX_RESTARTS against SLURM_RESTART_COUNT.
    local code=$1 restarts=${SLURM_RESTART_COUNT:-0} id=${SLURM_JOB_ID:-}
    if (( code == 138 || code == 140 )); then
        # 128 + SIGUSR1 / SIGUSR2: a rank got Slurm's warning in the few milliseconds before
        # Python ran its first line (afterwards the signal is recorded, never fatal), so it had
        # trained nothing since the last checkpoint: requeue it like a preempted run
        posebert_log "a rank was ended by SIGUSR$(( code == 138 ? 1 : 2 )) while starting," \
            "before it could record it: nothing trained since the last checkpoint; as preempted"
        code=75
    fi
    if (( code != 75 )); then
        posebert_log "ranks exited with code $code"
        exit "$code"
    fi
    if (( POSEBERT_STOPPING )); then
        posebert_log "checkpoint written; the job is being stopped: not requeued"
        exit 75
    fi
    if (( restarts >= POSEBERT_MAX_RESTARTS )); then
        posebert_log "checkpoint written; $restarts restarts reached POSEBERT_MAX_RESTARTS: not requeued (submit again to resume)"
        exit 75
    fi
    [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]] && id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    posebert_log "checkpoint written; requeueing $id (restart $((restarts + 1)) of at most $POSEBERT_MAX_RESTARTS)"
    if ! scontrol requeue "$id"; then
        posebert_log "scontrol requeue $id failed: submit again to resume"
        exit 75
    fi
    exit 0
}
