"""Prove the bindings against a real Xen 4.17 dom0: ``python -m xenpbr.hypervisor.selfcheck``.

Run as root in dom0 and compare with ``xl list`` / ``xl list -v`` (domid, Mem = mem_mib,
VCPUs = nr_online_vcpus, State = xl_state, Time(s) = cpu_time_s, UUID = uuid). A wrong
struct layout shows up as nonsense in those columns long before it corrupts anything.

It lives above the bindings (:mod:`xenpbr.ctypes_libxc`) because it uses the layer that
interprets them: each domain is printed as the raw ``xc_domaininfo_t`` fields (C names,
including those :class:`~xenpbr.hypervisor.base.DomainState` does not carry:
``shared_info_frame``, ``cpupool``, ``ssidref``, ``gpaddr_bits``, ``arch_config``, ...)
plus the DomainState decoded from them by
:func:`~xenpbr.hypervisor.libxc.domain_state_from_info`; ``--find-marker`` walks the P2M
with :class:`~xenpbr.hypervisor.guest_memory.GuestMemory`.

    --json                   machine-readable output (otherwise a short text summary)
    --vcpu-context DOMID     rip/rsp/cr3 of vcpu0, with the domain paused around the read
    --find-marker DOMID M    where bytes M occur in the guest (M as text, or hex:41424344);
                             the domain is paused during the scan
    --libdir DIR             load the Xen libraries from DIR (same as XENPBR_LIBDIR)

Exit status 0 when every requested check ran, 1 otherwise (the JSON says why).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from xenpbr.ctypes_libxc import foreignmemory, xenctrl, xenctrl_structs
from xenpbr.ctypes_libxc.xenctrl import XenCtrl
from xenpbr.ctypes_libxc.xenctrl_structs import DomainFlags, XcDomainInfo
from xenpbr.errors import XenpbrError
from xenpbr.hypervisor.guest_memory import INVALID_MFN, GuestMemory
from xenpbr.hypervisor.libxc import domain_state_from_info

log = logging.getLogger(__name__)


def _hex(value: int) -> str:
    return f"{value:#x}"


def parse_marker(text: str) -> bytes:
    """``hex:0a0b`` -> raw bytes; anything else is UTF-8 text."""
    if text.startswith("hex:"):
        return bytes.fromhex(text[4:])
    return text.encode("utf-8")


def library_report(libdir: str | None) -> dict[str, Any]:
    """Which library files were loaded (or why not)."""
    report: dict[str, Any] = {}
    for name, loader in (("libxenctrl", xenctrl.libxenctrl),
                         ("libxenforeignmemory", foreignmemory.libxenforeignmemory)):
        try:
            report[name] = asdict(loader(libdir).xenpbr_info)
        except XenpbrError as exc:
            report[name] = {"error": str(exc)}
    return report


def struct_report() -> dict[str, int]:
    """Our struct sizes, so a report shows which layout assumptions it was made with."""
    return {
        "xc_domaininfo_t": ctypes.sizeof(xenctrl_structs.XcDomainInfo),
        "vcpu_guest_context_x86_64": ctypes.sizeof(xenctrl_structs.VcpuContextX86_64),
        "shared_info_x86_64": ctypes.sizeof(xenctrl_structs.SharedInfoX86_64),
    }


def raw_fields(raw: ctypes.Structure) -> dict[str, Any]:
    """Every field of a C struct by its C name (padding left out): nested structs as
    dicts, byte arrays as hex."""
    out: dict[str, Any] = {}
    for name, *_ in raw._fields_:
        if name.startswith("pad"):
            continue
        value = getattr(raw, name)
        if isinstance(value, ctypes.Structure):
            value = raw_fields(value)
        elif isinstance(value, ctypes.Array):
            value = bytes(value).hex()
        out[name] = value
    return out


def domain_json(raw: XcDomainInfo) -> dict[str, Any]:
    """One domain as JSON: the raw ``xc_domaininfo_t`` (C field names), then the
    :class:`DomainState` decoded from it and the derived columns ``xl list`` prints."""
    state = domain_state_from_info(raw)
    out = raw_fields(raw)
    out["shared_info_frame"] = _hex(raw.shared_info_frame)
    reason = state.shutdown_reason
    out.update(
        flag_names=[flag.name for flag in DomainFlags if raw.flags & flag],
        domid=state.domid,
        uuid=str(state.uuid),
        running=state.running,
        blocked=state.blocked,
        paused=state.paused,
        shutdown=state.shutdown,
        dying=state.dying,
        hvm=state.hvm,
        shutdown_reason=None if reason is None else reason.name,
        shutdown_code=state.shutdown_code,
        max_vcpu_id=state.max_vcpu_id,
        xl_state=state.xl_state,
        mem_mib=raw.tot_pages * 4096 // (1 << 20),
        maxmem_mib=raw.max_pages * 4096 // (1 << 20),
        cpu_time_s=round(raw.cpu_time / 1e9, 1),
    )
    return out


def vcpu_report(xc: XenCtrl, domid: int, vcpu: int = 0) -> dict[str, Any]:
    """vcpu registers read with the domain paused (so rip/rsp belong together)."""
    with xc.paused(domid):
        ctx = xc.vcpu_getcontext(domid, vcpu)
    return {
        "domid": domid,
        "vcpu": vcpu,
        "rip": _hex(ctx.rip),
        "rsp": _hex(ctx.rsp),
        "cr3": _hex(ctx.cr3),
        "cr3_mfn": _hex(ctx.cr3_mfn),
        "flags": _hex(ctx.flags),
        "vcpu_flags": str(ctx.vcpu_flags),
        "kernel_sp": _hex(ctx.kernel_sp),
        "fs_base": _hex(ctx.fs_base),
        "gs_base_kernel": _hex(ctx.gs_base_kernel),
    }


def _walk(xc: XenCtrl, fmem: Any, domid: int, method: str) -> tuple[dict[str, Any], Any]:
    """Walk the P2M one way; return (summary, GuestMemory or None if unusable)."""
    try:
        memory = GuestMemory(xc, fmem, domid, p2m_method=method)
        table = memory.p2m()
    except XenpbrError as exc:
        return {"method": method, "error": f"{type(exc).__name__}: {exc}"}, None
    valid = sum(1 for mfn in table if mfn != INVALID_MFN)
    return {"method": method, "entries": len(table), "valid": valid}, memory


def marker_report(xc: XenCtrl, fmem: Any, domid: int, marker: bytes,
                  limit: int = 64) -> dict[str, Any]:
    """Find *marker* in a paused PV guest; also cross-check the two P2M walks."""
    report: dict[str, Any] = {"domid": domid, "marker_hex": marker.hex()}
    with xc.paused(domid):
        report["max_gpfn"] = _hex(xc.domain_maximum_gpfn(domid))
        walks = [_walk(xc, fmem, domid, method) for method in ("tree", "linear")]
        report["p2m"] = [summary for summary, _ in walks]
        usable = [memory for _, memory in walks if memory is not None]
        if not usable:
            raise XenpbrError(f"no usable p2m for domain {domid}: {report['p2m']}")
        if len(usable) == 2:
            report["p2m_walks_agree"] = usable[0].p2m() == usable[1].p2m()
        memory = usable[-1]  # prefer the linear list, like Xen's save code
        hits = memory.find(marker, limit=limit)
        report["hits"] = [
            {"pfn": _hex(pfn), "offset": off, "mfn": _hex(memory.pfn_to_mfn(pfn)),
             "gpa": _hex(pfn * 4096 + off)}
            for pfn, off in hits
        ]
    return report


def collect(xc: XenCtrl, fmem: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Everything the selfcheck reports, given open handles."""
    version = xc.version()
    report: dict[str, Any] = {
        "xen_version": {"major": version.major, "minor": version.minor,
                        "extra": version.extra, "string": str(version)},
        "domains": [domain_json(d) for d in xc.domain_getinfolist(0, 1024)],
    }
    if args.vcpu_context is not None:
        report["vcpu_context"] = vcpu_report(xc, args.vcpu_context)
    if args.find_marker is not None:
        domid, text = args.find_marker
        report["find_marker"] = marker_report(xc, fmem, int(domid), parse_marker(text),
                                              args.max_hits)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xenpbr.hypervisor.selfcheck",
        description="Check xenpbr's libxenctrl/libxenforeignmemory bindings in dom0.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--libdir", help="load Xen libraries from this directory")
    parser.add_argument("--vcpu-context", type=int, metavar="DOMID",
                        help="report vcpu0 rip/rsp/cr3 of DOMID (paused around the read)")
    parser.add_argument("--find-marker", nargs=2, metavar=("DOMID", "MARKER"),
                        help="search DOMID's memory for MARKER (text or hex:...)")
    parser.add_argument("--max-hits", type=int, default=64, help="stop after this many hits")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging to stderr")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"libraries": library_report(args.libdir), "structs": struct_report()}
    try:
        with XenCtrl(libdir=args.libdir) as xc, \
                foreignmemory.ForeignMemory(libdir=args.libdir) as fmem:
            report.update(collect(xc, fmem, args))
    except XenpbrError as exc:
        report["ok"] = False
        report["error"] = {"type": type(exc).__name__, "message": str(exc)}
        return report
    report["ok"] = True
    return report


def _print_text(report: dict[str, Any]) -> None:
    if not report["ok"]:
        print(f"FAILED: {report['error']['type']}: {report['error']['message']}")
        return
    print(f"Xen {report['xen_version']['string']}")
    print(f"{'domid':>5} {'mem_mib':>8} {'vcpus':>5} state  {'time_s':>8}  uuid")
    for dom in report["domains"]:
        print(f"{dom['domid']:>5} {dom['mem_mib']:>8} {dom['nr_online_vcpus']:>5} "
              f"{dom['xl_state']} {dom['cpu_time_s']:>8}  {dom['uuid']}")
    for key in ("vcpu_context", "find_marker"):
        if key in report:
            print(f"{key}: {json.dumps(report[key])}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_text(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
