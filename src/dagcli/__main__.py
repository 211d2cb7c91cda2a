"""`python -m dagcli ...` (also what `accelerate launch -m dagcli train ...` and `torchrun -m dagcli ...` run).

For several processes on CPU use `accelerate launch --multi_gpu --num_processes N -m dagcli train --device cpu
...` or `torchrun --nproc_per_node N -m dagcli train --device cpu ...` (see docs/multi-gpu.md): accelerate's
`--cpu` launcher starts only one process unless it is given an MPI host file.
"""

from __future__ import annotations

import os
import sys

SINGLE_CPU_LAUNCH = (
    "warning: `accelerate launch --cpu` started a single process (without --mpirun_hostfile it ignores "
    "--num_processes); for N processes on CPU use `accelerate launch --multi_gpu --num_processes N -m dagcli "
    "... --device cpu` or `torchrun --nproc_per_node N -m dagcli ... --device cpu`"
)


def single_cpu_launch(env: dict[str, str]) -> bool:
    """True when `accelerate launch --cpu --num_processes N>1` ran us as its only process.

    That launcher sets MASTER_ADDR only when asked for more than one process, but starts just one (no
    WORLD_SIZE, no MPI rank variables).
    """
    cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    distributed = any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    return cpu and "MASTER_ADDR" in env and not distributed


if __name__ == "__main__":
    if single_cpu_launch(dict(os.environ)):
        print(SINGLE_CPU_LAUNCH, file=sys.stderr)

    from dagcli.cli import main

    main()
