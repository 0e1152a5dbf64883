"""The drift stage as a Prefect task; the logic is :func:`fuserec.stages.drift.drift`."""

from prefect import task

from fuserec.stages import drift as stage

drift = task(name="drift")(stage.drift)
