"""The torchx component of a shardrec training job.

Usable from the stock torchx CLI as well as from ``shardrec submit``::

    torchx run -s local_cwd shardrec/launch/components.py:train --config job.yaml -j 1x2
    torchx run -s slurm shardrec/launch/components.py:train --config /shared/job.yaml -j 4x8 --gpu 8 \\
        --max_restarts 3 -- --train.steps=10000

torchx reads this file on its own (it execs the source and lints the signature's syntax tree), so
the annotations are typing's ``Optional``/``Dict``/``List``, evaluated when the function is defined
(no ``X | None``, no ``from __future__ import annotations``), and imports are absolute.
"""

import shlex
from typing import Dict, List, Optional

from torchx import specs
from torchx.specs import macros

# torchrun's agents share one store with their ranks across restarts by default; restarted ranks
# then find the addresses their dead predecessors published there and fail to connect, or hang. With
# sharing off, every rendezvous round gets a store of its own, hosted by its rank 0.
_FRESH_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

ROLE = "trainer"
"""Name of the job's one role; its replicas are the nodes."""
WORKER = "shardrec.train.worker"


def train(
    *overrides: str,
    config: str,
    j: str = "1x2",
    run_dir: Optional[str] = None,
    resume: str = "auto",
    image: str = "shardrec:latest",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_restarts: int = 0,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    python: str = "python",
    name: str = "shardrec",
) -> specs.AppDef:
    """Trains a shardrec job on NODES x PROCS ranks, each node one torchrun agent.

    Args:
        overrides: job overrides passed to every rank, e.g. ``-- --train.steps=1000``
        config: the job YAML as the ranks see it (a path on the target)
        j: NODESxPROCS: nodes (replicas) and processes (ranks) per node
        run_dir: the run folder as the ranks see it; unset: ``<run.root>/<run.name>/<app id>``
        resume: ``auto`` (latest checkpoint of the run folder if any, else a fresh start), a
            checkpoint path, or ``none``
        image: container image with shardrec installed (ignored by local_cwd)
        cpu: CPUs per node
        gpu: GPUs per node (each rank takes one: PROCS must not exceed it)
        memMB: memory per node in MB
        env: environment of every rank, e.g. ``NCCL_DEBUG=INFO,FOO=bar``
        mounts: mounts of every node, e.g. ``type=bind,src=/data,dst=/data,readonly``
        max_restarts: times torchrun restarts the ranks after one fails; each restart resumes
            from the latest complete checkpoint
        max_retries: times the scheduler resubmits a failed node (a restarted node resumes too)
        rdzv_port: port of the rendezvous store on the first node (multi-node only)
        python: the interpreter that runs torchrun on the target
        name: the job's name on the scheduler
    """
    nnodes, nproc = parse_nodes(j)
    if gpu > 0 and nproc > gpu:
        raise ValueError(f"-j {j} puts {nproc} ranks on each node but --gpu {gpu}: each rank needs a GPU of its own")
    torchrun = torchrun_args(python=python, nnodes=nnodes, nproc=nproc, rdzv_port=rdzv_port, max_restarts=max_restarts)
    where = ["--run-dir", run_dir] if run_dir else ["--run-id", macros.app_id]
    worker = ["-m", WORKER, "--config", config, *where, "--resume", resume, *overrides]
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name=ROLE,
                image=image,
                entrypoint="bash",
                # bash expands the rendezvous host the scheduler exports on every node.
                args=["-c", " ".join(torchrun + [shlex.quote(a) for a in worker])],
                num_replicas=nnodes,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB),
                env={"LOGLEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **_FRESH_STORE, **(env or {})},
                port_map={"c10d": rdzv_port},
                max_retries=max_retries,
                mounts=specs.parse_mounts(mounts) if mounts else [],
            )
        ],
    )


def parse_nodes(j: str) -> tuple[int, int]:
    """``"NxM"`` -> (N nodes, M processes per node)."""
    nodes, _, procs = j.partition("x")
    if not (nodes.isdigit() and procs.isdigit() and int(nodes) > 0 and int(procs) > 0):
        raise ValueError(f"-j must be NODESxPROCS with positive integers, e.g. 1x2 or 2x8; got {j!r}")
    return int(nodes), int(procs)


def torchrun_args(*, python: str, nnodes: int, nproc: int, rdzv_port: int, max_restarts: int) -> list[str]:
    """The torchrun command line of one node, shell-quoted except the rendezvous endpoint."""
    # One node rendezvouses with itself on a free port; several meet at the first node's store,
    # whose host the scheduler exports in the variable macros.rank0_env names ("$$" escapes "$").
    endpoint = "localhost:0" if nnodes == 1 else f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}"
    args = [
        python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-id={macros.app_id}", f"--max-restarts={max_restarts}", "--tee=3",
        f"--role={ROLE}",
    ]
    return [shlex.quote(a) for a in args] + [f"--rdzv-endpoint={endpoint}"]
