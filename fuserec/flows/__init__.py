"""Prefect flows: thin chains of the stages in fuserec.tasks."""

import fuserec.flows.environment  # noqa: F401  (opt-outs before Prefect loads)
