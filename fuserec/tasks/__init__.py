"""Pipeline stages: one module per stage, each a Prefect task over files on disk.

Every stage is ``@task def <stage>(params: Params) -> str`` returning the path it wrote; ``.fn`` is the
plain function that ``fuserec stage <stage>`` (and so ``dvc repro``) calls.
"""

STAGES = ("validate", "clean", "split", "train", "fuse", "evaluate", "export", "report")
