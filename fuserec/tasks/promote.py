"""The promote stage as a Prefect task; the logic is :func:`fuserec.stages.promote.promote`."""

from prefect import task

from fuserec.stages import promote as stage

promote = task(name="promote")(stage.promote)
