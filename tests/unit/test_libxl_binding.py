"""The in-process libxl binding (:mod:`xenpbr.ctypes_libxc.libxl`) and its user
:class:`~xenpbr.xl.inprocess.InProcessXl`, which falls back to ``xl`` when libxl cannot
be opened. On real Xen: tests/lab/test_standby_real.py (xenpbrd renames standbys
through it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xenpbr.ctypes_libxc import libxl
from xenpbr.ctypes_libxc._loader import XenLibraryNotFound, load_library
from xenpbr.xl import inprocess

XEN_LIBDIR = os.environ.get("XENPBR_TEST_LIBDIR", "")
ON_XEN = Path("/proc/xen/privcmd").exists() or Path("/dev/xen/privcmd").exists()
needs_real_libs = pytest.mark.skipif(
    not Path(XEN_LIBDIR, libxl.LIBRARY.soname).exists(),
    reason=f"Debian's Xen 4.17 libraries not unpacked at {XEN_LIBDIR!r}")


@needs_real_libs
def test_debians_libxenlight_has_every_bound_symbol() -> None:
    lib = load_library(libxl.LIBRARY, libxl.SIGNATURES, {}, XEN_LIBDIR)
    assert lib.xenpbr_info.missing_symbols == ()
    assert lib.libxl_error_to_string(libxl.ERROR_INVAL) == b"inval"
    log = load_library(libxl.TOOLLOG, libxl.TOOLLOG_SIGNATURES, {}, XEN_LIBDIR)
    assert log.xenpbr_info.missing_symbols == ()


@needs_real_libs
@pytest.mark.skipif(ON_XEN, reason="outside Xen libxl cannot open its context")
def test_without_xen_the_context_fails_naming_the_call_and_xl_takes_over(
        monkeypatch, caplog) -> None:
    with pytest.raises(libxl.LibxlCallFailed, match="libxl_ctx_alloc failed: libxl error"):
        libxl.LibxlContext(XEN_LIBDIR)
    renamed = []
    monkeypatch.setattr(inprocess.commands, "rename",
                        lambda xl, old, new: renamed.append((xl, old, new)) or None)
    with inprocess.InProcessXl(XEN_LIBDIR, xl=("xl",)) as names:
        assert names.context is None
        assert names.rename("a--standby", "a") is None
    assert renamed == [(("xl",), "a--standby", "a")]
    assert "renames run `xl rename`" in caplog.text


def test_a_missing_libxenlight_says_what_to_install(tmp_path) -> None:
    with pytest.raises(XenLibraryNotFound, match="install libxentoollog1"):
        libxl.LibxlContext(str(tmp_path))


class FakeContext:
    """A LibxlContext stand-in: one domain named ``a--standby`` (domid 7)."""

    def __init__(self) -> None:
        self.names = {"a--standby": 7}

    def domid(self, name: str) -> int | None:
        return self.names.get(name)

    def rename(self, domid: int, old: str, new: str) -> None:
        if new in self.names:
            raise libxl.LibxlCallFailed("libxl_domain_rename", -6, "INVAL")
        self.names[new] = self.names.pop(old)

    def close(self) -> None:
        pass


def in_process_with(context: FakeContext) -> inprocess.InProcessXl:
    names = inprocess.InProcessXl.__new__(inprocess.InProcessXl)
    names.xl, names.context = ("xl",), context  # type: ignore[assignment]
    return names


def test_a_rename_through_libxl_names_what_went_wrong() -> None:
    context = FakeContext()
    names = in_process_with(context)
    assert names.rename("gone--standby", "a") == "no domain is named gone--standby"
    context.names["a"] = 3  # the crashed domain still holds the name
    assert names.rename("a--standby", "a") == ("libxl_domain_rename failed: libxl error -6 "
                                               "(INVAL)")
    del context.names["a"]
    assert names.rename("a--standby", "a") is None and context.names == {"a": 7}


def test_a_lookup_through_libxl_and_through_xl_when_libxl_fails(monkeypatch) -> None:
    context = FakeContext()
    names = in_process_with(context)
    assert names.domid("a--standby") == 7 and names.domid("nobody") is None

    def broken(name: str) -> int | None:
        raise libxl.LibxlCallFailed("libxl_name_to_domid", -3, "fail")
    context.domid = broken  # type: ignore[method-assign]
    monkeypatch.setattr(inprocess.commands, "domid", lambda xl, name: 9)
    assert names.domid("a") == 9


def test_free_memory_through_libxl_in_mib_and_through_xl_when_libxl_fails(monkeypatch) -> None:
    context = FakeContext()
    names = in_process_with(context)
    context.free_memory_kib = lambda: 5 * 1024 + 1023  # type: ignore[attr-defined]
    assert names.free_memory_mib() == 5  # rounded down: never more room than Xen has

    def broken() -> int:
        raise libxl.LibxlCallFailed("libxl_get_free_memory", -3, "fail")
    context.free_memory_kib = broken  # type: ignore[attr-defined]
    monkeypatch.setattr(inprocess.commands, "free_memory_mib", lambda xl: None)
    assert names.free_memory_mib() is None
