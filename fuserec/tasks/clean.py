"""The clean stage as a Prefect task; the logic is :func:`fuserec.stages.clean.clean`."""

from prefect import task

from fuserec.stages import clean as stage

clean = task(name="clean")(stage.clean)
