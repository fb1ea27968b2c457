"""The migration-stream codec on streams captured from real Xen 4.17 by ``xl save -c``."""

from __future__ import annotations

import pytest

VERIFY = "/usr/lib/xen-4.17/bin/verify-stream-v2"

FIFO_CAPTURE = """
import hashlib, json, os, subprocess
from xenpbr.stream import read_stream, write_stream
fifo = "/tmp/capture.fifo"
if os.path.exists(fifo):
    os.unlink(fifo)
os.mkfifo(fifo)
save = subprocess.Popen(["xl", "save", "-c", NAME, fifo], stderr=subprocess.PIPE)
captured, pages = hashlib.sha256(), {}

class Tee:
    # Hash every byte xl wrote while the codec parses it, to compare with regeneration.
    def __init__(self, f):
        self.f = f
    def read(self, n=-1):
        data = self.f.read(n)
        captured.update(data)
        return data

with open(fifo, "rb") as src:
    stream = read_stream(Tee(src), on_page=lambda pfn, t, data: pages.__setitem__(pfn, bytes(data)))
_, err = save.communicate(timeout=300)
with open("/tmp/regen.xl", "wb") as out:
    size = write_stream(out, stream, pages.__getitem__)
with open("/tmp/regen.xl", "rb") as f:
    regenerated = hashlib.file_digest(f, "sha256").hexdigest()
os.unlink(fifo)
print(json.dumps({"save_rc": save.returncode, "stderr": err.decode()[-400:], "size": size,
                  "pages": len(pages), "captured": captured.hexdigest(),
                  "regenerated": regenerated}))
"""


@pytest.mark.timeout(600)  # a boot and a checkpoint: about 80 s on a slow machine
def test_real_capture_round_trips_byte_for_byte(xen_host, lab_domain) -> None:
    guest = lab_domain("stream", mode="count")
    guest.create()
    guest.wait_for_console(r"count=2 ")
    image = f"/tmp/{guest.name}.xl"
    guest.save_checkpoint(image)
    verdict = xen_host.run([VERIFY, "-f", "xl", "-i", image], check=False)
    assert verdict.rc == 0, verdict.stderr
    ours = xen_host.run(["python3", "-m", "xenpbr.stream", image], timeout=600)
    assert "round trip: byte-identical" in ours.stdout, ours.stdout + ours.stderr
    assert "x86 PV from Xen 4.17" in ours.stdout
    xen_host.run(["rm", "-f", image])


@pytest.mark.timeout(600)  # a boot, a checkpoint, a regeneration: about 80 s
def test_capture_through_a_fifo_regenerates_the_same_bytes(xen_host, lab_domain,
                                                           dom0_python) -> None:
    """The capture path of phase-based reboot: xl writes into a FIFO and the codec parses
    the stream as it arrives. The regenerated stream equals the bytes xl wrote, Xen's
    verifier accepts it, and xl restores the guest from it."""
    guest = lab_domain("fifo", mode="count")
    guest.create()
    guest.wait_for_console(r"count=2 ")
    result = dom0_python(FIFO_CAPTURE.replace("NAME", repr(guest.name)), timeout=600)
    assert result["save_rc"] == 0, result["stderr"]
    assert result["pages"] == 128 * 256  # every page of the 128 MiB guest carried data
    assert result["regenerated"] == result["captured"]
    verdict = xen_host.run([VERIFY, "-f", "xl", "-i", "/tmp/regen.xl"], check=False)
    assert verdict.rc == 0, verdict.stderr
    offset = guest.console_size()
    guest.destroy()
    guest.restore("/tmp/regen.xl")
    resumed = int(guest.wait_for_console(r"count=(\d+)", after=offset).group(1))
    assert resumed > 1, "the guest came back from the regenerated image, not a reboot"
    xen_host.run(["rm", "-f", "/tmp/regen.xl"])
