"""The public conformance kit for algorithm plugins.

A plugin's tests subclass :class:`AlgorithmTests` in two lines::

    class TestMyAlgo(AlgorithmTests):
        algorithm = MyAlgo

Every check is also a plain function in :mod:`fuserec.testing.checks` that raises
:class:`ConformanceError` with a message saying what to fix.
"""

from fuserec.testing.checks import ConformanceError
from fuserec.testing.data import planted_dataset
from fuserec.testing.suite import AlgorithmTests

__all__ = ["AlgorithmTests", "ConformanceError", "planted_dataset"]
