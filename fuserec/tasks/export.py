"""The export stage as a Prefect task; the logic is :func:`fuserec.stages.export.export`."""

from prefect import task

from fuserec.stages import export as stage

export = task(name="export")(stage.export)
