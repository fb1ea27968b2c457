"""``xenpbrd``'s command line: parse, load settings, open Xen and serve.

Separate from the event loop (:mod:`xenpbr.daemon`) because starting is its own
concern: ``--help`` and ``--version`` must never open Xen, usage errors exit 2, and a
runtime failure (Xen, xenstored, the state directory or the config file unusable) exits
1 with one line for the operator or systemd's journal, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from xenpbr import __version__, logsetup, settings
from xenpbr.daemon import Daemon
from xenpbr.errors import XenpbrError
from xenpbr.images.store import ImageStore
from xenpbr.state import StateDir


class DaemonStartError(XenpbrError):
    """xenpbrd cannot start: its state directory or Xen is not usable."""


def build_parser() -> argparse.ArgumentParser:
    """xenpbrd's command line (``--help`` must print help, never start the daemon)."""
    parser = argparse.ArgumentParser(
        prog="xenpbrd", description="xenpbr's daemon: captures images at phase boundaries "
        "of registered Xen PV domains and recovers them when they crash.",
        epilog="Exit status: 0 stopped by SIGTERM/SIGINT, 1 runtime failure (Xen, "
        "xenstored, state directory or config file unusable), 2 usage error. "
        "Settings: docs/settings.md.")
    parser.add_argument("--version", action="version", version=f"xenpbrd {__version__}")
    parser.add_argument("--config", type=Path, metavar="PATH",
                        help=f"config file (default: ${settings.CONFIG_ENV}, else "
                        f"{settings.DEFAULT_PATH} if it exists)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="state directory, overriding [state] dir and "
                        "$XENPBR_STATE_DIR (default /var/lib/xenpbr)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at debug level (overrides [log] level)")
    return parser


def main(argv: list[str] | os.PathLike[str] | None = None) -> int:
    """Entry point of ``xenpbrd`` (``argv``: its arguments, default sys.argv[1:]).

    Usage errors exit 2 (argparse), runtime failures 1 with one line on stderr: an
    operator (or systemd's journal) needs the cause, not a traceback. A path instead of
    a list is the state root (``xenpbr daemon``'s older call)."""
    if isinstance(argv, (str, os.PathLike)):
        argv = ["--state-dir", os.fspath(argv)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version: 0; a usage error: 2
        return exc.code if isinstance(exc.code, int) else 0
    try:
        conf = settings.with_overrides(settings.load(args.config), state_dir=args.state_dir,
                                       log_level="debug" if args.verbose else None)
        settings.use(conf)
        logsetup.setup(conf.log_level)
        return _serve(conf)
    except XenpbrError as exc:
        _fail(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        settings.use(None)


def _fail(message: str) -> None:
    """One line on stderr; under systemd at priority err (``<3>``), not info."""
    prefix = "<3>" if logsetup.stderr_is_journal() else ""
    print(f"{prefix}xenpbrd: error: {message}", file=sys.stderr)


def _usable_state_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there, before serving:
    a recovery that cannot write its intent record would fail outright later."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise DaemonStartError(f"state directory {path} is not usable: "
                               f"{exc.strerror or exc}; fix its permissions or set "
                               f"{settings.hint('state_dir')}") from exc
    return path


def _serve(conf: settings.Settings) -> int:
    """Open Xen and xenstore with ``conf`` (:class:`~xenpbr.settings.Settings`) and
    serve until SIGTERM/SIGINT."""
    from xenpbr.hypervisor.libxc import LibxcHypervisor
    from xenpbr.store_restorer import StoreRestorer
    from xenpbr.xenstore import XenstoreClient
    from xenpbr.xl.inprocess import InProcessXl
    from xenpbr.xl.toolstack import XlToolstack

    state = StateDir(_usable_state_dir(conf.state_dir))
    store = ImageStore(state.images_root, default_quota=conf.image_quota)
    libdir = str(conf.xen_libdir) if conf.xen_libdir else None
    with ExitStack() as stack:
        try:
            libxc = LibxcHypervisor(libdir=libdir)
            hv = stack.enter_context(libxc)
            xs_dom = stack.enter_context(XenstoreClient(libdir))
            xs_req = stack.enter_context(XenstoreClient(libdir))
        except OSError as exc:  # /dev/xen/privcmd, xenstored's socket ...
            raise DaemonStartError(f"cannot open Xen (run xenpbrd in dom0, as root, with "
                                   f"xenstored running): {exc}") from exc
        in_process = stack.enter_context(InProcessXl(libdir))
        store.guest_pages = libxc.read_restored_pfns  # restores check the pages left to Xen
        Daemon(state, store, hv, xs_dom, xs_req,
               toolstack=XlToolstack(hypervisor=hv, renamer=in_process.rename),
               restorer=StoreRestorer(store, rename=in_process.rename,
                                      domid_of=in_process.domid,
                                      free_memory_mib=in_process.free_memory_mib)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
