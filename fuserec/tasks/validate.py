"""The validate stage as a Prefect task; the logic is :func:`fuserec.stages.validate.validate`."""

from prefect import task

from fuserec.stages import validate as stage

validate = task(name="validate")(stage.validate)
