"""Layer-parallel DFA across processes and devices (docs/pipeline.md).

``DFAPipeline`` splits a model into stages, one per rank of a
torch.distributed process group; activations go forward, the last stage
sends the output error ``e`` of each micro-batch to every stage, and each
stage computes its own DFA gradients from it (no backward traffic).
``process_grid`` builds the 2-D grid of pipeline stages x DDP replicas.
"""

from .grid import ProcessGrid, process_grid
from .pipeline import DFAPipeline
from .schedules import SCHEDULES, saved_micro_batches, stage_order
from .wire import PipelineError, PipelineTimeout

__all__ = ["DFAPipeline", "PipelineError", "PipelineTimeout", "ProcessGrid", "process_grid", "SCHEDULES",
           "stage_order", "saved_micro_batches"]
