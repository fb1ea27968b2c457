"""Zero pages left to Xen (:mod:`xenpbr.images.allocate_only`): when a hot stream may
leave them out, and the restore's read-back that catches a Xen that did not zero them
(against the fake xl of :mod:`tests.unit.test_images_xl`; on real Xen:
tests/lab/test_phasereboot_real.py)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import pytest

from tests.unit.test_images_xl import FakeXl, captured, data, store  # noqa: F401
from xenpbr import settings
from xenpbr.images import allocate_only, hotcache, restore
from xenpbr.stream import InMemoryPages, read_stream
from xenpbr.stream import format as fmt

ZERO = bytes(4096)


@pytest.fixture
def fake(tmp_path, data, monkeypatch) -> FakeXl:  # noqa: F811 - data is the shared one
    xl = FakeXl(tmp_path, data)
    monkeypatch.setenv("FAKE_XL_STATE", str(xl.state))
    xl.add_domain("vm1")
    xl.knob("accept_any")  # the fake cannot restore an allocate-only stream: tests check
    monkeypatch.setattr(allocate_only, "_distrusted", [])
    monkeypatch.setattr(allocate_only, "trusted", lambda: not allocate_only._distrusted)
    return xl


class Reader:
    """A restored domain's pages as ``store.guest_pages`` reads them: zero, unless told."""

    def __init__(self, nonzero: Sequence[int] = ()) -> None:
        self.nonzero = set(nonzero)
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, domid: int, pfns: Sequence[int]) -> list[bytes]:
        self.calls.append((domid, list(pfns)))
        return [b"\xc2" * 4096 if pfn in self.nonzero else ZERO for pfn in pfns]


@pytest.mark.parametrize("cmdline,scrubs", [
    ("console=com1 scrub-domheap", True),
    ("scrub-domheap=1 dom0_mem=1G", True),
    ("scrub-domheap=yes bootscrub=idle", True),
    ("scrub-domheap bootscrub=off", False),
    ("scrub-domheap no-bootscrub", False),
    ("scrub-domheap=0", False),
    ("no-scrub-domheap", False),
    ("console=com1 dom0_mem=6144M", False),
    ("", False),
])
def test_only_a_xen_that_scrubs_every_freed_page_is_trusted(cmdline: str, scrubs: bool) -> None:
    assert allocate_only.scrubs_freed_pages(cmdline) is scrubs


def test_the_setting_decides_and_auto_asks_xen(monkeypatch) -> None:
    monkeypatch.setattr(allocate_only, "_distrusted", [])
    for asked, cmdline, expected in [("yes", "", True), ("no", "scrub-domheap", False),
                                     ("auto", "scrub-domheap", True), ("auto", "", False),
                                     ("auto", None, False)]:
        monkeypatch.setattr(settings, "current",
                            lambda a=asked: settings.Settings(xen_zero_pages=a))
        monkeypatch.setattr(allocate_only, "_xen_commandline", lambda c=cmdline: c)
        assert allocate_only.trusted() is expected, (asked, cmdline)
    allocate_only.distrust("a test")
    monkeypatch.setattr(settings, "current", lambda: settings.Settings(xen_zero_pages="yes"))
    assert not allocate_only.trusted()  # a restore saw a non-zero page: never again


def test_a_typo_in_the_setting_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected auto, or yes/no"):
        settings.parse_auto_bool("sometimes")
    assert settings.parse_auto_bool(" On ") == "yes"


def test_the_sample_spreads_over_the_pages_ends_included() -> None:
    assert allocate_only.sample([1, 2, 3], 64) == [1, 2, 3]
    picked = allocate_only.sample(list(range(1000)), 5)
    assert picked == [0, 250, 500, 749, 999]


def allocating_stream(store, fake, reader: Reader):  # noqa: F811
    image = captured(store, fake)
    store.guest_pages = reader
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    assert path is not None
    return image, path, hotcache.lookup(store, image)


def test_a_hot_stream_leaves_its_zero_pages_to_xen(store, fake, data) -> None:  # noqa: F811
    image, path, hot = allocating_stream(store, fake, Reader())
    pages = InMemoryPages()
    stream = read_stream(io.BytesIO(path.read_bytes()), on_page=pages.on_page)
    xalloc = [e.pfn for rec in stream.libxc.page_data_records() for e in rec
              if e.type_bits == fmt.PAGE_TYPE_XALLOC]
    original = InMemoryPages()
    read_stream(io.BytesIO(data), on_page=original.on_page)
    synthetic = 1  # the synthetic stream has one XALLOC entry of its own
    assert hot.allocated == len(xalloc) - synthetic > 0
    assert all(original.pages[pfn] == ZERO for pfn in xalloc if pfn in original.pages)
    assert path.stat().st_size == len(data) - 4096 * hot.allocated
    assert pages.pages == {p: c for p, c in original.pages.items() if c != ZERO
                           or original.types[p] != fmt.PAGE_TYPE_NOTAB}
    assert set(hot.allocated_sample) <= set(xalloc)


def test_a_restore_reads_a_sample_back_before_the_guest_runs(store, fake) -> None:  # noqa: F811
    reader = Reader()
    image, path, hot = allocating_stream(store, fake, reader)
    (fake.state / "domains" / "vm1").unlink()
    result = restore(store, image, xl=fake.argv)
    assert result.hot and (fake.state / "restored.xl").read_bytes() == path.read_bytes()
    assert reader.calls == [(7, list(hot.allocated_sample))]
    assert fake.paused("vm1") or "-p" in next(c for c in fake.calls() if c[0] == "restore")


def test_a_page_xen_did_not_zero_sends_the_restore_to_the_page_store(
        store, fake, data, caplog) -> None:  # noqa: F811
    image, path, hot = allocating_stream(store, fake, Reader())
    store.guest_pages = Reader(nonzero=hot.allocated_sample[3:4])
    (fake.state / "domains" / "vm1").unlink()
    with caplog.at_level(logging.ERROR):
        result = restore(store, image, xl=fake.argv)
    assert not result.hot and (fake.state / "restored.xl").read_bytes() == data
    assert [c[0] for c in fake.calls()].count("destroy") == 1  # the unchecked domain
    assert not path.exists() and not allocate_only.trusted()
    assert f"pfn {hot.allocated_sample[3]:#x} is not zero" in caplog.text


def test_without_a_reader_an_allocating_stream_is_not_used(store, fake, data) -> None:  # noqa: F811
    image, path, _ = allocating_stream(store, fake, Reader())
    store.guest_pages = None  # `xenpbr restore` in a process without libxc
    (fake.state / "domains" / "vm1").unlink()
    result = restore(store, image, xl=fake.argv)
    assert not result.hot and (fake.state / "restored.xl").read_bytes() == data
    assert path.exists()  # still good for xenpbrd


def test_the_page_store_path_leaves_zero_pages_to_xen_too(store, fake, data) -> None:  # noqa: F811
    image = captured(store, fake)  # no hot stream: the regeneration into xl's FIFO
    reader = Reader()
    store.guest_pages = reader
    (fake.state / "domains" / "vm1").unlink()
    result = restore(store, image, xl=fake.argv)
    sent = (fake.state / "restored.xl").read_bytes()
    assert not result.hot and len(sent) < len(data) and (len(data) - len(sent)) % 4096 == 0
    (domid, sample), = reader.calls
    assert domid == 7 and len(sample) == min(allocate_only.SAMPLE, (len(data) - len(sent)) // 4096)
    (fake.state / "domains" / "pbr-guest").unlink()  # the name in the synthetic stream
    result = restore(store, image, paused=False, xl=fake.argv)  # it runs at once: no check
    assert (fake.state / "restored.xl").read_bytes() == data and len(reader.calls) == 1


def test_xenpbr_reboot_reads_restored_pages_through_libxc_when_it_can(monkeypatch) -> None:
    from xenpbr import cli
    from xenpbr.hypervisor import libxc

    class Store:
        guest_pages = None

    class Hypervisor:
        closed = False

        def read_restored_pfns(self, domid, pfns):
            return []

        def close(self):
            Hypervisor.closed = True

    store = Store()
    monkeypatch.setattr(libxc, "LibxcHypervisor", Hypervisor)
    with cli._guest_pages_for(store):
        assert store.guest_pages is not None  # the restore may use an allocating stream
    assert store.guest_pages is None and Hypervisor.closed

    def no_xen():
        raise OSError("/dev/xen/privcmd: No such file or directory")
    monkeypatch.setattr(libxc, "LibxcHypervisor", no_xen)
    with cli._guest_pages_for(store):
        assert store.guest_pages is None  # regenerates every page: slower, never wrong
