#!/usr/bin/env bash
# Distributed training with torchrun: tools/dist_train.sh CONFIG GPUS [train.py args]
#   GPUS: processes on this node (one per GPU).
# Multi-node: run it on every node with the same NNODES, MASTER_ADDR (node 0's
# address) and MASTER_PORT, and each node's NODE_RANK (0 .. NNODES-1).
# PYTHON: the interpreter to run (default: python on PATH).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG GPUS [train.py args]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
# torchrun would take 0 or a word and fail with a Python traceback.
positive='^[1-9][0-9]*$'
if ! [[ $GPUS =~ $positive ]]; then
    echo "$0: GPUS must be a positive whole number (processes on this node, one per GPU)," \
         "got '$GPUS': e.g. $0 $CONFIG 8" >&2
    exit 2
fi
if ! [[ $NNODES =~ $positive ]] || ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
    echo "$0: NNODES must be a positive whole number and NODE_RANK one of 0 .. NNODES-1," \
         "got NNODES='$NNODES' NODE_RANK='$NODE_RANK'" >&2
    exit 2
fi
PORT=${MASTER_PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

PYTHONPATH="$(dirname "$0")/..":${PYTHONPATH:-} \
"${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
