"""The report stage as a Prefect task; the logic is :func:`fuserec.stages.report.report`."""

from prefect import task

from fuserec.stages import report as stage

report = task(name="report")(stage.report)
