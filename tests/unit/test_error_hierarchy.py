"""Every exception class defined in ``xenpbr.images`` and ``xenpbr.stream`` is a
:class:`~xenpbr.errors.XenpbrError`, so an operator tool catches them in one place."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import xenpbr.images
import xenpbr.stream
from xenpbr.errors import XenpbrError

#: Modules leaving images/ on another branch (xltool moves out with its XlError).
MOVING_OUT = {"xenpbr.images.xltool"}


def _modules() -> list[str]:
    names = []
    for package in (xenpbr.images, xenpbr.stream):
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return sorted(set(names) - MOVING_OUT)


@pytest.mark.parametrize("module_name", _modules())
def test_exceptions_derive_from_xenpbr_error(module_name: str) -> None:
    module = importlib.import_module(module_name)
    stray = [name for name, cls in inspect.getmembers(module, inspect.isclass)
             if cls.__module__ == module_name and issubclass(cls, BaseException)
             and not issubclass(cls, XenpbrError)]
    assert not stray, f"{module_name}: {stray} are not XenpbrError subclasses"


def test_hot_stream_errors_are_image_errors_under_their_old_names() -> None:
    from xenpbr.images import errors, hotcache
    assert hotcache.NoRoom is errors.NoRoom and hotcache.Cancelled is errors.Cancelled
    assert issubclass(errors.NoRoom, errors.ImageError)
    assert issubclass(errors.Cancelled, errors.ImageError)
