"""The public conformance kit for algorithm and fuser plugins.

A plugin's tests subclass :class:`AlgorithmTests` in two lines::

    class TestMyAlgo(AlgorithmTests):
        algorithm = MyAlgo

Fusers subclass :class:`FuserTests` the same way (``fuser = MyFuser``). Every check is also a plain
function in :mod:`fuserec.testing.checks` that raises :class:`ConformanceError` saying what to fix.
Rating-prediction plugins call :func:`check_rater` (:mod:`fuserec.testing.raters`).
"""

from fuserec.testing.checks import ConformanceError
from fuserec.testing.data import planted_dataset
from fuserec.testing.fusers import FuserTests
from fuserec.testing.raters import check_rater
from fuserec.testing.suite import AlgorithmTests

__all__ = ["AlgorithmTests", "ConformanceError", "FuserTests", "check_rater", "planted_dataset"]
