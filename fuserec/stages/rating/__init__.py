"""The rating task's stages (``task: rating``): the same stage names and folders as ranking, other content.

Validate and clean are shared (clean keeps every rating in ``clean/ratings.parquet``); from split on, each
ranking stage hands over to its counterpart here when ``params.task`` is ``rating``, so ``dvc repro`` and
``fuserec run`` run the same code for both tasks. See docs/concepts/rating.md.
"""
