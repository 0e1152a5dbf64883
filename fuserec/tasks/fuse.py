"""The fuse stage as a Prefect task; the logic is :func:`fuserec.stages.fuse.fuse`."""

from prefect import task

from fuserec.stages import fuse as stage

fuse = task(name="fuse")(stage.fuse)
