"""The evaluate stage as a Prefect task; the logic is :func:`fuserec.stages.evaluate.evaluate`."""

from prefect import task

from fuserec.stages import evaluate as stage

evaluate = task(name="evaluate")(stage.evaluate)
