#!/usr/bin/env bash
# One shard of a `pycosdist experiment` per Slurm array task (see docs/distributed.md).
#
#   sbatch --array=1-N scripts/slurm_experiment.sh CONFIG ROOT N [pycosdist experiment options...]
#
# Task K runs `pycosdist experiment CONFIG --shard K/N --out ROOT/shardK`: the cells of the seeds k with
# k mod N = K-1 (a seed's paired cells stay in one shard). A task that is stopped (time limit, node
# failure) resumes where it stopped when it is submitted again. When every task has finished:
#
#   pycosdist experiment merge ROOT/shard* --out ROOT/merged
#
# (or submit that with `sbatch --dependency=afterok:<array job id> --wrap "..."`).
#
# Environment (optional): PYCOSDIST, the command (default: pycosdist); CORPUS and TEACHER, an existing
# corpus root and teacher checkpoint shared by every shard (experiment.corpus, experiment.teacher; default:
# each shard synthesizes the corpus and trains the teacher itself, which needs identical nodes and
# software for the shards to agree; `merge` checks that they do). Extra options go to every shard, e.g.
#   --set student.train.device=cuda --set experiment.torchrun=4   (each cell on 4 GPUs of the node)
#
#SBATCH --job-name=pycosdist-experiment
#SBATCH --output=%x-%A_%a.out
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: sbatch --array=1-N $0 CONFIG ROOT N [pycosdist experiment options...]" >&2
    exit 2
fi
config=$1 root=$2 shards=$3
shift 3
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "$0: SLURM_ARRAY_TASK_ID is not set: submit with sbatch --array=1-$shards" >&2
    exit 2
fi
shared=()
if [ -n "${CORPUS:-}" ]; then shared+=(--set "experiment.corpus=$CORPUS"); fi
if [ -n "${TEACHER:-}" ]; then shared+=(--set "experiment.teacher=$TEACHER"); fi

# pycosdist validates K/N itself (1 <= K <= N <= experiment.seeds), with a usage error (exit 2).
exec ${PYCOSDIST:-pycosdist} experiment "$config" --shard "$SLURM_ARRAY_TASK_ID/$shards" \
    --out "$root/shard$SLURM_ARRAY_TASK_ID" --no-progress ${shared[@]+"${shared[@]}"} "$@"
