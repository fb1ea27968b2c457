"""Otherworld-style resurrection from outside the guest.

When a guest kernel crashes, the memory of its applications is almost always intact. The
applications that registered *resurrection regions* (docs/specs/resurrection-region.md)
get their latest acknowledged records back after the recovery: dom0 reads the regions out
of the crashed domain before destroying it (:mod:`.extract`), keeps what is valid durably
(:mod:`.vault`), and hands it to the guest once it is back (:mod:`.deliver`). The shared
types are in :mod:`.model`; the region format itself in :mod:`xenpbr.guestproto.resurrection`.
"""
