"""The 2-D process grid: ``stages`` pipeline stages x ``replicas`` data-parallel copies of the pipeline.

Global rank ``g = replica * stages + stage``: each replica's stages are
consecutive ranks (one machine per replica keeps the activation and ``e``
traffic inside it); stage ``s`` of every replica forms one data-parallel
group, over which DDP averages that stage's gradients once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ProcessGrid:
    """This rank's place in the grid and its two groups."""

    stages: int
    replicas: int
    stage: int
    replica: int
    pipeline_group: object  # the ranks of this replica's stages: DFAPipeline(group=...)
    data_group: object      # the ranks holding this stage in every replica: DFAPipeline(data_parallel_group=...)


def process_grid(stages: int, replicas: int) -> ProcessGrid:
    """Create the grid's groups; call it on every rank, in the same order as the other collectives."""
    for name, value in (("stages", stages), ("replicas", replicas)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not dist.is_initialized():
        raise RuntimeError("process_grid needs an initialised process group (torch.distributed.init_process_group)")
    world = dist.get_world_size()
    if world != stages * replicas:
        raise ValueError(f"a grid of {stages} stages x {replicas} replicas needs {stages * replicas} processes, "
                         f"the world has {world}: start stages * replicas processes")
    rank = dist.get_rank()
    stage, replica = rank % stages, rank // stages
    pipeline_group = data_group = None
    for r in range(replicas):  # every rank creates every group, in the same order (torch.distributed's rule)
        group = dist.new_group([r * stages + s for s in range(stages)])
        if r == replica:
            pipeline_group = group
    for s in range(stages):
        group = dist.new_group([r * stages + s for r in range(replicas)])
        if s == stage:
            data_group = group
    return ProcessGrid(stages, replicas, stage, replica, pipeline_group, data_group)
