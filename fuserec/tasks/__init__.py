"""The pipeline's stages as Prefect tasks: thin wrappers, one module per stage.

Each ``fuserec.tasks.<stage>.<stage>`` is ``prefect.task`` around the plain function
``fuserec.stages.<stage>.<stage>(params) -> str``; ``.fn`` is that function, which ``fuserec stage``
(and so ``dvc repro``) calls. What each stage reads and writes is declared in :mod:`fuserec.stages.table`.
"""
