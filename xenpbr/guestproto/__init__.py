"""The guest <-> dom0 phase protocol (contract: ``docs/phase-protocol.md``).

Split by who may load what:

* :mod:`~xenpbr.guestproto.wire`, :mod:`~xenpbr.guestproto.request` and
  :mod:`~xenpbr.guestproto.invalidation`: the wire format both sides share (key names,
  bounds, request parser, verdicts, acks, invalidation messages). They import nothing
  that touches xenstore or Xen, so the guest agent imports them without dom0's code.
* :mod:`~xenpbr.guestproto.gate`: dom0's admission of requests (rate limits, seqs).
* :mod:`~xenpbr.guestproto.control`: dom0's xenstore I/O (absolute paths, watches,
  acks) and :class:`~xenpbr.guestproto.control.PhaseProtocol`.

This package file imports none of them, so importing ``xenpbr.guestproto.wire`` loads
only the wire format.
"""
