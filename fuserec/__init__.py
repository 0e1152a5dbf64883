"""fuserec: build, fuse, evaluate and serve recommenders as one reproducible pipeline."""

__version__ = "0.1.0"
