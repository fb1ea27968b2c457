"""Every exception class defined anywhere in ``xenpbr`` is a
:class:`~xenpbr.errors.XenpbrError`, so an operator tool catches them in one place.

The few that must not be caught as operator errors are listed in :data:`NOT_OPERATOR_ERRORS`,
each with its reason."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import xenpbr
from xenpbr.errors import XenpbrError

#: ``module.Class`` -> why it is deliberately not a XenpbrError.
NOT_OPERATOR_ERRORS = {
    "xenpbr.guestproto.request._BadInput":
        "the parser's internal signal, turned into RequestRefused before it leaves",
    "xenpbr.hypervisor.fake.FakeNotModelled":
        "a test asked the fake for something it does not model: an AssertionError, so no "
        "`except XenpbrError` in the code under test can swallow the test's own bug",
}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(xenpbr.__path__, "xenpbr."))


@pytest.mark.parametrize("module_name", _modules())
def test_exceptions_derive_from_xenpbr_error(module_name: str) -> None:
    module = importlib.import_module(module_name)
    stray = [name for name, cls in inspect.getmembers(module, inspect.isclass)
             if cls.__module__ == module_name and issubclass(cls, BaseException)
             and not issubclass(cls, XenpbrError)
             and f"{module_name}.{name}" not in NOT_OPERATOR_ERRORS]
    assert not stray, f"{module_name}: {stray} are not XenpbrError subclasses"


def test_hot_stream_errors_are_image_errors_under_their_old_names() -> None:
    from xenpbr.images import errors, hotcache
    assert hotcache.NoRoom is errors.NoRoom and hotcache.Cancelled is errors.Cancelled
    assert issubclass(errors.NoRoom, errors.ImageError)
    assert issubclass(errors.Cancelled, errors.ImageError)
