"""The demo's guest application and its report (the demo itself runs on real Xen)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from xenpbr_lab.demo import DemoReport, render, restore_path, write_report
from xenpbr_lab.demo_app import answer, build_index, corpus, fill_cache


def test_warm_up_is_deterministic_and_indexes_every_word() -> None:
    docs = corpus(500)
    assert docs == corpus(500)
    index = build_index(docs)
    assert all(doc_id in index[word] for doc_id, words in enumerate(docs) for word in words)
    assert answer(index) == len(index.get("alpha", set()) & index.get("omega", set()))
    cache = fill_cache(docs, index, words=5)
    assert len(cache) == 5 and all(len(top) <= 10 for top in cache.values())


def test_report_json_has_the_keys_automation_reads(tmp_path: Path) -> None:
    report = DemoReport(normal_reboot_s=30.0, phase_reboot_s=7.5, reduction_pct=75.0,
                        recovered_from_phase="app",
                        phase_reboot_breakdown={"crash_seen": 0.0, "restore_finished": 6.0})
    write_report(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    for key in ("normal_reboot_s", "phase_reboot_s", "reduction_pct", "recovered_from_phase"):
        assert key in data
    text = render(report)
    assert "75.0 %" in text and "restore_finished 6.00" in text


def test_the_report_names_the_restore_path_from_xenpbrds_log() -> None:
    log = ("INFO xenpbr.images.restore: restored demo-pbr/20261204T1 (app, 201326592 bytes) "
           "as domain demo-pbr (domid 3) in 9.10 s: before xl 0.10 s\n"
           "INFO xenpbr.images.restore: restored demo-pbr/20261204T2 (app, 201326592 bytes) "
           "as domain demo-pbr (domid 5) from its hot stream in 2.10 s: before xl 0.1 s\n"
           "INFO xenpbr.images.restore: restored other/x (kernel) as domain other (domid 6) "
           "in 5.00 s\n")
    assert restore_path(log, "demo-pbr") == "hot stream"
    assert restore_path(log, "other") == "regenerated"
    assert restore_path(log, "absent") == ""
    assert re.search(r"restore path \(xenpbrd's log\) +hot stream",
                     render(DemoReport(restore_path="hot stream")))


def test_the_cpu_hog_spins_while_held_and_is_gone_after() -> None:
    import os
    import time

    from xenpbr_lab.cpuhog import cpu_hog
    with cpu_hog(2) as pids:
        assert len(pids) == 2
        deadline = time.monotonic() + 30  # a loaded machine may not run them at once
        while True:
            ticks = [int(open(f"/proc/{pid}/stat").read().split()[13]) for pid in pids]
            if all(t > 0 for t in ticks) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert all(t > 0 for t in ticks)  # user time: they spin
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = open(f"/proc/{pid}/stat").read().split()[2]
        assert state == "Z", f"hog {pid} still running"
