"""A test kit for handler authors: the simulated kernel as a pytest fixture, and the
conformance suite every handler -- built-in or third-party -- is expected to pass.

* :mod:`tcmu_py.testing.plugin` -- the ``make_sim_target`` fixture
  (``pytest_plugins = ["tcmu_py.testing.plugin"]`` in your root ``conftest.py``);
* :class:`ConformanceSuite` -- subclass it as ``TestSomething`` and list your
  :class:`ConformanceCase` objects;
* the CDB builders and answer checks the suite is written with, for your own tests.

See docs/handlers.md, "Testing your handler".
"""

import pytest

# Before the suite or the plugin is imported: their plain ``assert``s then explain
# themselves, and pytest does not warn when it loads the plugin after a test module
# imported it.
pytest.register_assert_rewrite("tcmu_py.testing.conformance", "tcmu_py.testing.plugin")

from . import _cdb as cdb  # noqa: E402
from ._cases import (  # noqa: E402
    DEFAULT_SIZE,
    ConfigFactory,
    ConformanceCase,
    HandlerFactory,
    default_cases,
)
from .conformance import ConformanceSuite, InjectedBug, faulty  # noqa: E402

__all__ = [
    "DEFAULT_SIZE",
    "ConfigFactory",
    "ConformanceCase",
    "ConformanceSuite",
    "HandlerFactory",
    "InjectedBug",
    "cdb",
    "default_cases",
    "faulty",
]
