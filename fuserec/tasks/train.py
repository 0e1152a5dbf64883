"""The train stage as Prefect tasks: every fit in one (``fuserec stage train``), or one per plugin and carve.

The logic is :mod:`fuserec.stages.train`; ``train_plugin`` takes a name, not a dataset, so that a Dask
worker process can run it from the files under ``params.outputs``.
"""

from prefect import task

from fuserec.stages import train as stage

train = task(name="train")(stage.train)
train_plugin = task(name="train-plugin", task_run_name="{carve}[{name}]")(stage.train_plugin)
