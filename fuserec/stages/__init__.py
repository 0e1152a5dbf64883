"""The pipeline's stages as plain functions over files: ``fuserec.stages.<stage>.<stage>(params)``.

No Prefect here: :mod:`fuserec.tasks` wraps each function as a task and :mod:`fuserec.flows` chains them;
``fuserec stage <name>`` (and so ``dvc repro``) calls the same functions. What each stage reads, writes
and depends on is declared once, in :data:`STAGES`.
"""

from fuserec.stages.table import STAGE_NAMES, STAGES, Output, Stage, stage

__all__ = ["STAGES", "STAGE_NAMES", "Output", "Stage", "stage"]
