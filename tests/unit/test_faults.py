"""The fault injector over synthetic guest memory: page tables built here, real x86 code,
a FakeHypervisor for pause/vCPUs (the real run: tests/lab/test_faults_real.py)."""

from __future__ import annotations

import random
import struct

import pytest

from xenpbr.faults.decode import Decoder
from xenpbr.faults.inject import InjectionRefused, Injector
from xenpbr.faults.kernel_memory import PTE_PRESENT, PTE_PSE, PTE_RW, KernelMemory, NotMapped
from xenpbr.faults.kinds import (
    JMP_SELF,
    FaultKind,
    NoTarget,
    hang_fault,
    operand_fault,
    stack_fault,
    text_fault,
)
from xenpbr.faults.symbols import KernelSymbols, SymbolMapError, system_map_for
from xenpbr.hypervisor.base import VcpuRegisters
from xenpbr.ctypes_libxc.xenctrl_structs import VcpuFlags
from xenpbr.hypervisor.fake import FakeHypervisor

PAGE = 4096
TEXT = 0xFFFFFFFF81000000
RODATA = 0xFFFFFFFF82000000
STACK = 0xFFFFC90000010000  # a vmalloc'd 16 KiB stack: 4 pages
# push rbp; mov rbp,rsp; mov rax,[rdi+8]; mov dword [rax+8],1; pop rbp; ret
FUNC_A = bytes.fromhex("554889e5488b4708c74008010000005dc3")
# mov eax, 0x2a; add rsp, 0x10; ret
FUNC_B = bytes.fromhex("b82a0000004883c410c3")
SYSTEM_MAP = f"""\
{TEXT:016x} T _stext
{TEXT:016x} T func_a
{TEXT + 0x40:016x} t func_b
{TEXT + 0x80:016x} T xen_safe_halt
{TEXT + 0x90:016x} T _sinittext
{TEXT + 0x100:016x} T init_only
{TEXT + 0x140:016x} T _einittext
{TEXT + 0x180:016x} T _etext
{RODATA:016x} D linux_banner
"""


class Frames:
    """A domain's machine frames as a dict; tables are built by :meth:`map`."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.next = 0x1000
        self.root = self.alloc()
        self.writes: list[tuple[int, int, bytes]] = []

    def alloc(self) -> int:
        self.next += 1
        self.pages[self.next] = bytearray(PAGE)
        return self.next

    def read(self, mfn: int) -> bytes:
        return bytes(self.pages[mfn])

    def write(self, mfn: int, offset: int, data: bytes) -> None:
        self.writes.append((mfn, offset, data))
        self.pages[mfn][offset:offset + len(data)] = data

    def map(self, vaddr: int, data: bytes = b"") -> int:
        table = self.root
        for shift in (39, 30, 21):
            index = (vaddr >> shift) & 0x1FF
            (entry,) = struct.unpack_from("<Q", self.pages[table], index * 8)
            if not entry & PTE_PRESENT:
                entry = (self.alloc() << 12) | PTE_PRESENT | PTE_RW
                struct.pack_into("<Q", self.pages[table], index * 8, entry)
            table = entry >> 12 & 0xFFFFFFFFFF
        leaf = self.alloc()
        self.pages[leaf][:len(data)] = data
        struct.pack_into("<Q", self.pages[table], ((vaddr >> 12) & 0x1FF) * 8,
                         (leaf << 12) | PTE_PRESENT)
        return leaf


@pytest.fixture
def guest() -> Frames:
    frames = Frames()
    text = bytearray(b"\xcc" * PAGE)  # int3 padding between functions, as in a kernel
    text[0:len(FUNC_A)] = FUNC_A
    text[0x40:0x40 + len(FUNC_B)] = FUNC_B
    text[0x80:0x82] = b"\xfb\xc3"  # sti; ret: stands in for the idle routine
    frames.map(TEXT, bytes(text))
    frames.map(RODATA, b"Linux version 6.1.0-57-amd64 (debian-kernel@...)")
    for i in range(4):
        frames.map(STACK + i * PAGE, bytes(range(256)) * 16)
    return frames


@pytest.fixture
def symbols() -> KernelSymbols:
    return KernelSymbols.parse(SYSTEM_MAP, "test.map")


def vcpu(rsp: int = STACK + 4 * PAGE - 0x200, in_kernel: bool = True) -> VcpuRegisters:
    flags = VcpuFlags.ONLINE | (VcpuFlags.IN_KERNEL if in_kernel else VcpuFlags(0))
    return VcpuRegisters(vcpu=0, rip=TEXT + 4, rsp=rsp, rflags=0, cr3=0, flags=flags)


def memory(frames: Frames) -> KernelMemory:
    return KernelMemory(frames, frames.root << 12)


# -- symbols -----------------------------------------------------------------------------

def test_functions_are_text_symbols_outside_init_text(symbols) -> None:
    assert [f.name for f in symbols.functions] == ["func_a", "func_b", "xen_safe_halt"]
    assert symbols.locate(TEXT + 0x45) == "func_b+0x5"


def test_kallsyms_module_symbols_are_skipped() -> None:
    text = SYSTEM_MAP + "ffffffffc0000000 t mod_fn\t[xen_wdt]\n"
    assert "mod_fn" not in {f.name for f in KernelSymbols.parse(text).functions}


def test_debians_placeholder_map_is_refused_with_what_to_do() -> None:
    with pytest.raises(SymbolMapError, match="/proc/kallsyms"):
        KernelSymbols.parse("ffffffffffffffff B The real System.map is in the "
                            "linux-image-<version>-dbg package\n")


def test_a_line_that_is_no_symbol_is_named() -> None:
    with pytest.raises(SymbolMapError, match="line 2"):
        KernelSymbols.parse(SYSTEM_MAP.splitlines()[0] + "\nnot a symbol\n")


def test_system_map_is_found_beside_the_kernel(tmp_path) -> None:
    (tmp_path / "System.map-6.1.0-57-amd64").write_text(SYSTEM_MAP)
    (tmp_path / "System.map").write_text(SYSTEM_MAP)
    assert system_map_for(str(tmp_path / "vmlinuz-6.1.0-57-amd64")).name == \
        "System.map-6.1.0-57-amd64"
    assert system_map_for(str(tmp_path / "vmlinuz")).name == "System.map"
    with pytest.raises(SymbolMapError, match="/proc/kallsyms"):
        system_map_for(str(tmp_path / "none" / "vmlinuz-6.1"))


# -- page-table walk ---------------------------------------------------------------------

def test_translate_walks_four_levels(guest) -> None:
    mfn, offset = memory(guest).translate(TEXT + 0x42)
    assert guest.pages[mfn][0x40:0x40 + len(FUNC_B)] == FUNC_B and offset == 0x42


def test_unmapped_and_non_canonical_addresses_are_refused(guest) -> None:
    with pytest.raises(NotMapped, match="not present"):
        memory(guest).translate(TEXT + 0x200000)
    with pytest.raises(NotMapped, match="canonical"):
        memory(guest).translate(0x0000800000000000)


def test_a_2mib_page_is_followed(guest) -> None:
    l2 = KernelMemory(guest, guest.root << 12)
    # point the level-2 entry of TEXT at frame 0x4000 as a large page
    table = guest.root
    for shift in (39, 30):
        (entry,) = struct.unpack_from("<Q", guest.pages[table], ((TEXT >> shift) & 0x1FF) * 8)
        table = entry >> 12 & 0xFFFFFFFFFF
    struct.pack_into("<Q", guest.pages[table], ((TEXT >> 21) & 0x1FF) * 8,
                     (0x4000 << 12) | PTE_PRESENT | PTE_PSE)
    assert l2.translate(TEXT + 0x3123) == (0x4003, 0x123)


def test_reads_and_writes_cross_pages(guest) -> None:
    mem = memory(guest)
    start = STACK + PAGE - 4
    mem.write(start, b"ABCDEFGH")
    assert mem.read(start, 8) == b"ABCDEFGH" and len(guest.writes) == 2


# -- kinds -------------------------------------------------------------------------------

def bits_changed(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(20))
def test_stack_fault_flips_one_bit_of_a_live_word(guest, symbols, seed) -> None:
    cpu = vcpu()
    change = stack_fault(memory(guest), cpu, symbols, random.Random(seed))
    assert cpu.rsp & ~7 <= change.address < STACK + 4 * PAGE and change.address % 8 == 0
    assert memory(guest).read(change.address, 8) == change.old  # chosen, not written
    assert bits_changed(change.old, change.new) == 1 and "vCPU 0" in change.target


def test_stack_fault_needs_a_vcpu_in_the_kernel(guest, symbols) -> None:
    with pytest.raises(NoTarget, match="user mode"):
        stack_fault(memory(guest), vcpu(in_kernel=False), symbols, random.Random(1))


@pytest.mark.parametrize("seed", range(20))
def test_text_fault_flips_one_bit_inside_one_instruction(guest, symbols, seed) -> None:
    change = text_fault(memory(guest), Decoder(), symbols, random.Random(seed))
    assert bits_changed(change.old, change.new) == 1 and len(change.old) == len(change.new)
    starts = {TEXT + o for o in (0, 1, 4, 8, 15, 16)} | {TEXT + 0x40 + o for o in (0, 5, 9)}
    starts |= {TEXT + 0x80, TEXT + 0x81}
    assert change.address in starts and change.before and change.after


@pytest.mark.parametrize("seed", range(30))
def test_operand_fault_changes_an_operand_not_the_opcode(guest, symbols, seed) -> None:
    change = operand_fault(memory(guest), Decoder(), symbols, random.Random(seed))
    insn = next(Decoder().instructions(change.old, change.address))
    diff = [i for i, (a, b) in enumerate(zip(change.old, change.new)) if a != b]
    assert diff, "nothing changed"
    if "ModRM" in change.target:
        assert diff == [insn.modrm_offset]
        assert change.old[insn.modrm_offset] & 0xC7 == change.new[insn.modrm_offset] & 0xC7
    else:
        field = (insn.disp_offset, insn.disp_size) if "displacement" in change.target \
            else (insn.imm_offset, insn.imm_size)
        assert all(field[0] <= i < field[0] + field[1] for i in diff)
        assert bits_changed(change.old, change.new) == 1


def test_hang_fault_puts_jmp_self_at_the_idle_routine(guest, symbols) -> None:
    change = hang_fault(memory(guest), symbols)
    assert change.address == TEXT + 0x80 and change.new == JMP_SELF
    assert change.old == b"\xfb\xc3"


# -- the injector: refusals, pause, read-back --------------------------------------------

@pytest.fixture
def fake(guest):
    hv = FakeHypervisor()
    domid = hv.create_domain()
    hv.set_vcpu_registers(domid, 0, vcpu().replace(cr3=guest.root << 12))
    return hv, domid


def test_an_injection_writes_reads_back_and_unpauses(fake, guest, symbols) -> None:
    hv, domid = fake
    before = dict((k, bytes(v)) for k, v in guest.pages.items())
    injection = Injector(hv, lambda d: guest, symbols).inject("g", domid, FaultKind.STACK, 7)
    change = injection.change
    assert change is not None and memory(guest).read(change.address, 8) == change.new
    changed = [m for m, v in guest.pages.items() if bytes(v) != before[m]]
    assert len(changed) == 1  # one page, one word
    assert hv.pause_count(domid) == 0 and injection.to_json()["seed"] == 7


def test_the_same_seed_chooses_the_same_fault(fake, guest, symbols) -> None:
    hv, domid = fake
    a = Injector(hv, lambda d: guest, symbols).inject("g", domid, FaultKind.TEXT, 3).change
    guest.write(*guest.writes[-1][:2], a.old)  # undo it
    b = Injector(hv, lambda d: guest, symbols).inject("g", domid, FaultKind.TEXT, 3).change
    assert (a.address, a.new) == (b.address, b.new)


def test_a_map_of_another_kernel_changes_nothing(fake, guest) -> None:
    hv, domid = fake
    other = KernelSymbols.parse(SYSTEM_MAP.replace(f"{RODATA:016x} D", f"{TEXT:016x} D"))
    with pytest.raises(SymbolMapError, match="not the running kernel's"):
        Injector(hv, lambda d: guest, other).inject("g", domid, FaultKind.HANG, 1)
    assert not guest.writes and hv.pause_count(domid) == 0


@pytest.mark.parametrize("how, message", [("dom0", "dom0"), ("paused", "paused"),
                                          ("crashed", "not running"), ("hvm", "HVM")])
def test_refusals_come_before_any_change(guest, symbols, how, message) -> None:
    hv = FakeHypervisor()
    domid = 0 if how == "dom0" else hv.create_domain(hvm=how == "hvm",
                                                      paused=how == "paused")
    if how == "crashed":
        hv.crash(domid)
    with pytest.raises(InjectionRefused, match=message):
        Injector(hv, lambda d: guest, symbols).inject("g", domid, FaultKind.STACK, 1)
    assert not guest.writes


# -- the command -------------------------------------------------------------------------

@pytest.fixture
def cli_guest(tmp_path, monkeypatch, fake, guest):
    """``xenpbr inject`` wired to the synthetic guest: a fake xl that knows its domid,
    the FakeHypervisor as LibxcHypervisor, and the test's symbol map beside its kernel."""
    import os
    import stat

    from xenpbr.hypervisor import libxc
    from xenpbr.state import StateDir
    hv, domid = fake
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "xl").write_text(f'#!/bin/sh\n[ "$1" = domid ] && echo {domid}\nexit 0\n')
    (bindir / "xl").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    hv.machine_frames = lambda d: guest  # type: ignore[attr-defined]
    hv.close = lambda: None  # type: ignore[method-assign]
    monkeypatch.setattr(libxc, "LibxcHypervisor", lambda: hv)
    (tmp_path / "System.map-6.1-test").write_text(SYSTEM_MAP)
    state = StateDir(tmp_path / "s")
    state.register("web", {"name": "web", "kernel": str(tmp_path / "vmlinuz-6.1-test")},
                   "", "c")
    return state


def run_cli(state, *argv: str) -> int:
    from xenpbr import cli
    return cli.main(["--state-dir", str(state.root), *argv])


def test_inject_json_of_a_memory_fault_matches_the_contract(cli_guest, capsys) -> None:
    import json

    from tests.unit.test_cli_json_contract import contract, check
    assert run_cli(cli_guest, "inject", "web", "--fault", "operand", "--seed", "5",
                   "--json") == 0
    out = json.loads(capsys.readouterr().out)
    seen: set[str] = set()
    check(out, contract()["inject"][1], "", seen)
    assert {"seed", "change.symbol", "change.before", "change.after"} <= seen
    assert cli_guest.faults("web")[-1]["change"] == out["change"]  # on record


def test_inject_prints_what_it_changed(cli_guest, capsys) -> None:
    assert run_cli(cli_guest, "inject", "web", "--fault", "hang") == 0
    out = capsys.readouterr().out
    assert "xen_safe_halt+0x0" in out and "fbc3 -> ebfe" in out


def test_inject_refuses_while_a_capture_or_recovery_holds_the_domain(cli_guest, guest,
                                                                       capsys) -> None:
    from xenpbr.state import domain_lock
    with domain_lock(cli_guest, "web"):
        assert run_cli(cli_guest, "inject", "web", "--fault", "stack") == 1
    assert "capture or a recovery of it is running" in capsys.readouterr().err
    cli_guest.begin_recovery("web", {"phase": "app"})
    assert run_cli(cli_guest, "inject", "web", "--fault", "stack") == 1
    assert "recovery of it is under way" in capsys.readouterr().err
    assert not guest.writes and cli_guest.faults("web") == []


def test_inject_refuses_an_unknown_kind_and_a_stopped_domain(cli_guest, guest, capsys,
                                                           monkeypatch, tmp_path) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli(cli_guest, "inject", "web", "--fault", "meltdown")
    assert exc.value.code == 2 and "'meltdown' is no fault kind" in capsys.readouterr().err
    (tmp_path / "bin" / "xl").write_text("#!/bin/sh\necho 'no such domain' >&2\nexit 1\n")
    assert run_cli(cli_guest, "inject", "web", "--fault", "text") == 1
    assert "web is not running" in capsys.readouterr().err
    assert not guest.writes


def test_inject_without_a_usable_map_says_how_to_get_one(cli_guest, tmp_path, capsys) -> None:
    (tmp_path / "System.map-6.1-test").write_text(
        "ffffffffffffffff B The real System.map is in the linux-image-6.1-dbg package\n")
    assert run_cli(cli_guest, "inject", "web", "--fault", "stack") == 1
    assert "/proc/kallsyms" in capsys.readouterr().err


# -- xenpbr fault-check: what became of the fault ------------------------------------------


def test_fault_check_says_the_bytes_are_still_in_place(cli_guest, capsys) -> None:
    assert run_cli(cli_guest, "inject", "web", "--fault", "text", "--seed", "2") == 0
    capsys.readouterr()
    assert run_cli(cli_guest, "fault-check", "web") == 0
    assert "still there" in capsys.readouterr().out


def test_fault_check_says_when_the_bytes_were_overwritten_or_put_back(cli_guest, guest,
                                                                     capsys) -> None:
    import json
    assert run_cli(cli_guest, "inject", "web", "--fault", "stack", "--seed", "2") == 0
    capsys.readouterr()
    change = cli_guest.faults("web")[-1]["change"]
    address = int(change["address"], 16)
    memory(guest).write(address, bytes.fromhex(change["old"]))
    assert run_cli(cli_guest, "fault-check", "web", "--json") == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == "original"
    memory(guest).write(address, b"\x11" * 8)
    assert run_cli(cli_guest, "fault-check", "web", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == "overwritten" and out["now"] == "11" * 8


def test_fault_check_json_matches_the_contract(cli_guest, monkeypatch, capsys) -> None:
    import json

    import xenpbr.xenstore
    from tests.unit.test_cli_json_contract import check, contract
    from xenpbr.guestproto.control import prepare_domain
    from xenpbr.guestproto.reach import ANSWER_KEY, READY_KEY, REQUEST_KEY, parse_request
    from xenpbr.xenstore.fake import FakeXenstore, FakeXenstoreServer
    server = FakeXenstoreServer()
    server.create_domain(1)
    with server.connect(0) as dom0:
        prepare_domain(dom0, 1)
    with server.connect(1) as guest:
        guest.write(READY_KEY, "kprobes")

    class Answering(FakeXenstore):
        """dom0's client; the guest's counter answers each request at once."""

        def write(self, path: str, value: bytes | str) -> None:
            super().write(path, value)
            if path.endswith(REQUEST_KEY):
                asked = parse_request(value if isinstance(value, bytes) else value.encode())
                with server.connect(1) as guest:
                    guest.write(ANSWER_KEY, f"{asked.id} counting 4")
    monkeypatch.setattr(xenpbr.xenstore, "XenstoreClient", lambda: Answering(server, domid=0))
    assert run_cli(cli_guest, "inject", "web", "--fault", "operand", "--seed", "5",
                   "--count-runs", "--json") == 0
    injected = json.loads(capsys.readouterr().out)
    seen: set[str] = set()
    check(injected, contract()["inject"][1], "", seen)
    assert injected["reach"]["state"] == "counting" and {"reach.id", "reach.hits"} <= seen
    assert run_cli(cli_guest, "fault-check", "web", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    seen = set()
    check(out, contract()["fault-check"][1], "", seen)
    assert out["bytes"] == "in-place" and out["reach"]["hits"] == 4
    assert out["reach"]["stale"] is False and out["domid"] == out["domid_now"]


def test_count_runs_is_refused_for_a_fault_that_alters_no_instruction(cli_guest, guest,
                                                                     capsys) -> None:
    before = dict((k, bytes(v)) for k, v in guest.pages.items())
    assert run_cli(cli_guest, "inject", "web", "--fault", "stack", "--count-runs") == 1
    assert "only with --fault text or operand" in capsys.readouterr().err
    assert {k: bytes(v) for k, v in guest.pages.items()} == before  # nothing changed
    assert cli_guest.faults("web") == []


def test_fault_check_without_a_memory_fault_says_what_records_one(cli_guest,
                                                                  capsys) -> None:
    assert run_cli(cli_guest, "fault-check", "web") == 1
    assert "xenpbr inject --fault stack|text|operand|hang" in capsys.readouterr().err


def test_fault_check_reads_nothing_from_another_domain() -> None:
    from xenpbr.faults.check import check
    record = {"domain": "web", "domid": 3, "fault": "text", "injected_at": 1.0,
              "change": {"address": "0xffffffff81000000", "symbol": "f+0x5", "old": "55",
                         "new": "54"}, "reach": None}

    def never(*args: object) -> bytes:
        raise AssertionError("read the memory of a domain the fault never went into")
    for now in (None, 4):
        out = check(record, now, never)
        assert out["bytes"] == "gone" and out["now"] is None


@pytest.mark.parametrize("now, probed, state", [
    ("e9e2f6ffff", False, "in-place"),
    ("cce2f6ffff", True, "in-place"),  # the counter's int3 over the fault (seen in the lab)
    ("cce2f6ffff", False, "overwritten"),  # no counter: an int3 is something else
    ("e9aabbccdd", True, "probed"),  # an optimised kprobe's jump covers the bytes
    ("e9e3f6ffff", False, "original"),
])
def test_the_bytes_of_a_counted_instruction_read_through_its_kprobe(now, probed,
                                                                    state) -> None:
    from xenpbr.faults.check import bytes_state
    change = {"old": "e9e3f6ffff", "new": "e9e2f6ffff"}
    assert bytes_state(bytes.fromhex(now), change, probed) == state
