"""The split stage as a Prefect task; the logic is :func:`fuserec.stages.split.split`."""

from prefect import task

from fuserec.stages import split as stage

split = task(name="split")(stage.split)
