"""The bench's arithmetic and its reports (the runs themselves need real Xen)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from xenpbr_lab import bench, bench_report
from xenpbr_lab.bench import ConfigFacts, Sample


def samples() -> list[Sample]:
    out = []
    for run, (normal, pbr, xlr) in enumerate([(20.0, 6.0, 9.0), (22.0, 5.0, 8.0),
                                              (30.0, 7.0, 10.0)], 1):
        out += [Sample("app", 128, "normal", run, normal),
                Sample("app", 128, "phasereboot", run, pbr,
                       {"crash_seen": 0.0, "image_chosen": 0.1, "destroyed": 0.4,
                        "restore_started": 0.5, "restore_finished": 5.0 + run / 10,
                        "guest_ack": 5.2 + run / 10, "service_ready": 5.3 + run / 10}),
                Sample("app", 128, "xl-restore", run, xlr),
                Sample("app", 128, "phasereboot-standby", run, pbr / 2,
                       {"crash_seen": 0.0, "image_chosen": 0.1, "destroyed": 0.4,
                        "restore_started": 0.5, "restore_finished": 0.7,
                        "guest_ack": 0.9, "service_ready": 1.0})]
    return out


def test_summary_medians_spread_and_reduction_against_normal() -> None:
    rows = {r["method"]: r for r in bench.summarize(samples())}
    assert rows["normal"]["median_s"] == 22.0 and rows["normal"]["reduction_pct"] is None
    assert (rows["phasereboot"]["min_s"], rows["phasereboot"]["max_s"]) == (5.0, 7.0)
    assert rows["phasereboot"]["reduction_pct"] == round(100 * (1 - 6 / 22), 1)
    assert rows["xl-restore"]["runs"] == 3 and rows["xl-restore"]["median_s"] == 9.0
    assert rows["phasereboot"]["vs_xl_restore"] == round(6 / 9, 3)
    assert rows["phasereboot-standby"]["vs_xl_restore"] == round(3 / 9, 3)
    assert rows["normal"]["vs_xl_restore"] is None and rows["xl-restore"]["vs_xl_restore"] is None


def test_biggest_piece_of_the_timeline_is_named() -> None:
    found = bench.biggest_piece(samples())
    assert found["biggest"] == "restore_started->restore_finished"
    assert found["steps_median_s"]["restore_started->restore_finished"] == pytest.approx(4.7)


def test_reports_are_written_with_the_required_keys(tmp_path: Path) -> None:
    s = samples()
    facts = [ConfigFacts("app", 128, {"normal": 30.0}, [{"phase": "app", "capture_s": 4.2,
                                                         "paused_s": 3.1, "raw_bytes": 2**27,
                                                         "stored_bytes": 2**24}], 900.0)]
    detail = bench.as_json(bench.summarize(s), s, facts,
                           {"command": "xenpbr-lab bench", "date": "today", "repeats": 3,
                            "xen": "4.17.7", "machine": bench.machine()})
    written = bench_report.write(detail, tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(rows, list) and {r["method"] for r in rows} == set(bench.DEFAULT_METHODS)
    for row in rows:
        assert {"workload", "memory_mib", "method", "runs", "median_s", "min_s",
                "max_s"} <= set(row)
    md = (tmp_path / "results.md").read_text()
    assert ("| app | 128 MiB | phasereboot | 3 | 6.00 | 5.00 | 7.00 | 72.7 % less | 0.67x |"
            in md)
    assert "with a standby (`phasereboot-standby`" in md
    assert "| app | 128 MiB | " in md and "| `restore_started->restore_finished` |" in md
    assert {tmp_path / "results.json", tmp_path / "results.md"} <= set(written)


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    """The plot needs matplotlib, which only the ``bench`` extra installs (``make
    test`` has it; ``pip install -e '.[test]'`` alone does not)."""
    pytest.importorskip("matplotlib", reason="the bench extra is not installed")
    s = samples()
    detail = bench.as_json(bench.summarize(s), s, [],
                           {"command": "xenpbr-lab bench", "date": "today", "repeats": 3,
                            "xen": "4.17.7", "machine": bench.machine()})
    written = bench_report.write(detail, tmp_path)
    png = tmp_path / "results.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_apps_data_set_grows_with_the_guest() -> None:
    assert [bench.documents(m) for m in (128, 256, 512)] == [2560, 12800, 33280]
    assert bench.documents(64) == 1000  # never empty


def test_configurations_that_cannot_fit_are_named_not_silently_dropped() -> None:
    assert bench.fits("bare", 128) is None and bench.fits("app", 256) is None
    assert "app needs at least 192 MiB" in bench.fits("app", 128)


def test_store_bench_measures_every_variant_on_one_stream(tmp_path, monkeypatch) -> None:
    from tests.unit.streams import synth
    from xenpbr_lab import store_bench
    monkeypatch.setattr(store_bench, "LOCATIONS", {"a": str(tmp_path), "b": str(tmp_path)})
    data = b"".join(synth.iter_pv_stream(synth.PvStreamSpec(nr_pfns=600)))
    rows = store_bench.store_variants(data, repeats=1)
    assert [(r["store"], r["codec"]) for r in rows] == [("a", "none"), ("a", "zlib"),
                                                        ("b", "none"), ("b", "zlib")]
    assert all(r["regenerate_mib_s"] > 0 and r["hot_read_mib_s"] > 0 for r in rows)
    assert rows[1]["stored_mib"] < rows[0]["stored_mib"]  # synthetic pages compress
    codecs = {r["codec"]: r for r in store_bench.codec_candidates(data)}
    assert codecs["none"]["ratio"] == 1.0 and codecs["zlib-1"]["ratio"] > 1.0
    assert list(tmp_path.iterdir()) == []  # every scratch store removed


def test_a_run_with_the_fifo_method_reports_its_own_breakdown() -> None:
    samples = [bench.Sample("bare", 128, m, 1, d, {"crash_seen": 0.0, "restore_finished": d})
               for m, d in (("phasereboot", 2.0), ("phasereboot-fifo", 6.0))]
    assert bench.biggest_piece(samples)["steps_median_s"] == {"crash_seen->restore_finished": 2.0}
    fifo = bench.biggest_piece(samples, "phasereboot-fifo")
    assert fifo["steps_median_s"] == {"crash_seen->restore_finished": 6.0}


def test_restore_throughput_is_the_raw_stream_over_the_restore_step() -> None:
    detail = {"configs": [{"workload": "bare", "memory_mib": 128, "dom0_copy_mib_s": 70.0,
                           "capture": [{"phase": "kernel", "raw_bytes": 128 << 20}]}],
              "samples": [{"method": m, "workload": "bare", "memory_mib": 128,
                           "breakdown": {"restore_started": 0.5, "restore_finished": 0.5 + d}}
                          for m, d in (("phasereboot", 1.0), ("phasereboot", 3.0),
                                       ("phasereboot-fifo", 4.0))]}
    (row,) = bench_report.restore_throughput(detail)
    assert row["phasereboot"] == 64.0 and row["phasereboot-fifo"] == 32.0
    assert row["raw_mib"] == 128 and row["dom0_copy_mib_s"] == 70.0
    assert row["fraction_of_copy"] == 64.0 / 70.0


def test_the_native_copy_yardstick_runs_and_reports_both_methods() -> None:
    """NATIVE_COPY is what dom0 runs; here it runs on this machine, against its libc."""
    limits: list[float] = []

    class Local:
        def run(self, argv, timeout):
            limits.append(timeout)
            return subprocess.run(argv, check=True, capture_output=True, text=True)
    rates = bench._dom0_copy_rates(Local(), 8)
    assert set(rates) == {"memcpy", "dd_tmpfs"} and min(rates.values()) > 0
    # more than one 256 MiB buffer's worth: the copy goes round, and is still timed
    assert min(bench._dom0_copy_rates(Local(), 300).values()) > 0
    assert limits[1] > limits[0] >= 300  # the limit grows with the size


def test_merge_replaces_only_the_configurations_measured_again() -> None:
    def run(workloads, median, command):
        rows = [{"workload": w, "memory_mib": 256, "method": "normal", "median_s": median}
                for w in workloads]
        return {"meta": {"command": command, "date": "d"}, "rows": rows,
                "samples": [dict(r, run=1) for r in rows],
                "configs": [{"workload": w, "memory_mib": 256} for w in workloads]}
    merged = bench_report.merge(run(["bare", "app"], 1.0, "first"), run(["app"], 2.0, "second"))
    assert sorted((r["workload"], r["median_s"]) for r in merged["rows"]) == [("app", 2.0),
                                                                             ("bare", 1.0)]
    assert [r["command"] for r in merged["meta"]["runs"]] == ["first", "second"]
    assert merged["meta"]["runs"][1]["configs"] == ["app-256"]


def test_merged_runs_keep_the_machine_each_ran_on() -> None:
    def run(workload, cpu):
        machine = {"cpu": cpu, "cpus": 2, "accelerator": "QEMU TCG (no KVM)"}
        return {"meta": {"command": workload, "date": "d", "machine": machine},
                "rows": [], "samples": [], "configs": [{"workload": workload,
                                                         "memory_mib": 512}]}
    merged = bench_report.merge(run("bare", "Intel"), run("debian", "AMD"))
    assert [r["machine"]["cpu"] for r in merged["meta"]["runs"]] == ["Intel", "AMD"]
    assert bench_report._machines(merged["meta"]) == (
        "Intel (2 CPUs) for the rest; AMD (2 CPUs) for debian-512")


def test_the_timeline_is_per_configuration() -> None:
    def sample(workload, restore):
        return {"method": "phasereboot", "workload": workload, "memory_mib": 512,
                "breakdown": {"crash_seen": 0.0, "destroyed": 0.5,
                              "restore_finished": 0.5 + restore}}
    detail = {"configs": [{"workload": w, "memory_mib": 512} for w in ("bare", "debian")],
              "samples": [sample("bare", 2.0), sample("debian", 16.0), sample("debian", 18.0)]}
    lines = bench_report._timelines(detail)
    assert "| bare | 512 MiB | 0.50 | 2.00 | `destroyed->restore_finished` |" in lines
    assert "| debian | 512 MiB | 0.50 | 17.00 | `destroyed->restore_finished` |" in lines


def test_big_guests_grow_qemu_and_dom0_with_them() -> None:
    assert bench.host_sizes([128, 256, 512]) == {}  # the lab's defaults
    big = bench.host_sizes([128, 1740])
    assert big["dom0_memory_mib"] >= 3 * 1740  # store, hot stream, xl-restore checkpoint
    assert big["memory_mib"] >= big["dom0_memory_mib"] + 2 * 1740  # guest and standby
    assert bench.host_sizes([1024])["memory_mib"] < big["memory_mib"]


def test_bench_accepts_the_papers_size_and_refuses_others(monkeypatch, capsys) -> None:
    from xenpbr_lab import cli
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "cmd_bench", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["bench", "--memory", "1024,1740", "--qemu-memory", "16384"]) == 0
    assert seen["memory"] == [1024, 1740] and seen["qemu_memory"] == 16384
    with pytest.raises(SystemExit):
        cli.main(["bench", "--memory", "1700"])
    assert "'1700': expected a comma-separated list of 128, 256, 512, 1024, 1740" in \
        capsys.readouterr().err


def test_regen_bench_reports_each_variants_speedup_over_the_per_page_path(tmp_path) -> None:
    from xenpbr_lab import regen_bench
    raw = {"stream_bytes": 128 << 20, "data_pages": 32768,
           "times": {"per_page_sha256": [8.0, 8.4, 9.0], "batched_sha256": [5.0, 4.0, 4.5],
                     "batched_crc32": [2.1, 2.0, 2.6]}}
    row = regen_bench.summarize(128, raw)
    assert row["per_page_sha256"] == {"best_s": 8.0, "median_s": 8.4, "mib_s": 16.0,
                                      "speedup": 1.0}
    assert row["batched_crc32"]["speedup"] == 4.0 and row["batched_crc32"]["mib_s"] == 64.0
    report = {"command": "xenpbr-lab regen-bench", "date": "d", "xen": "4.17", "rows": [row]}
    json_path, md_path = regen_bench.write(report, tmp_path)
    assert json.loads(json_path.read_text())["rows"][0]["batched_sha256"]["speedup"] == 2.0
    assert "| 128 MiB | 128.0 | `batched_crc32` | 2.0 (2.1) | 64.0 | 4.0x |" in \
        md_path.read_text()


def scaled_detail() -> dict:
    """Two sizes of ``bare``: captures, stores and downtimes that grow with memory."""
    s = [Sample("bare", mib, method, 1, mib / k)
         for mib in (128, 512) for method, k in (("normal", 10), ("phasereboot", 40),
                                                   ("xl-restore", 50))]
    facts = [ConfigFacts("bare", mib, {}, [
        {"phase": "kernel", "paused_s": mib / 100, "raw_bytes": mib << 20,
         "stored_bytes": (mib // 8) << 20},
        {"phase": "app", "paused_s": mib / 50, "raw_bytes": (mib + 2) << 20,
         "stored_bytes": (mib // 4) << 20}], 700.0,
                         xenpbrd_rss_mib={"idle": 40.0, "protecting": 40.0 + mib / 64})
             for mib in (128, 512)]
    return bench.as_json(bench.summarize(s), s, facts,
                         {"command": "xenpbr-lab bench", "date": "today", "repeats": 1,
                          "xen": "4.17.7", "machine": bench.machine()})


def test_each_cost_is_tabled_against_guest_memory() -> None:
    rows = {r["memory_mib"]: r for r in bench_report.scaling(scaled_detail())}
    assert rows[512]["capture_paused_s"] == pytest.approx(5.12 + 10.24)
    assert rows[512]["store_mib"] == 128 and rows[512]["hot_stream_mib"] == 514
    assert rows[128]["downtime_s"] == {"normal": 12.8, "phasereboot": 3.2, "xl-restore": 2.56}
    md = bench_report.markdown(scaled_detail())
    assert "## How each cost grows with guest memory" in md
    assert rows[512]["xenpbrd_mib"] == 8.0 and rows[128]["xenpbrd_mib"] == 2.0
    assert "| bare | 512 MiB | 15.36 | 128.0 | 514.0 | 8.0 | 51.20 | 12.80 | 10.24 |" in md


def test_xenpbrd_memory_not_measured_is_said_not_guessed() -> None:
    detail = scaled_detail()
    detail["configs"][0]["xenpbrd_rss_mib"] = {"idle": 40.0}  # died before "protecting"
    del detail["configs"][1]["xenpbrd_rss_mib"]  # a run from before it was measured
    rows = bench_report.scaling(detail)
    assert [r["xenpbrd_mib"] for r in rows] == [None, None]
    assert "| bare | 512 MiB | 15.36 | 128.0 | 514.0 | - |" in bench_report.markdown(detail)


def test_the_hot_stream_is_tabled_as_written_and_read_from_xenpbrds_log() -> None:
    log = ("... hot stream of b-bare-1740-pbr/20261207T200418Z-b2 ready: 9999 bytes in 1 s\n"
           "... hot stream of b-bare-1740-pbr/20261207T200419Z-b3 ready: 142606336 bytes in "
           "10.26 s, 411557 zero pages left to Xen\n"
           "... hot stream of b-bare-128-pbr/20261207T200420Z-b4 ready: 5 bytes in 1 s\n")
    assert bench.hot_stream_bytes(log, "b-bare-1740-pbr") == 142606336
    assert bench.hot_stream_bytes(log, "b-bare-1024-pbr") is None
    detail = scaled_detail()
    detail["configs"][1]["hot_stream_bytes"] = 136 << 20  # zero pages left to Xen
    rows = {r["memory_mib"]: r for r in bench_report.scaling(detail)}
    assert rows[512]["hot_stream_mib"] == 136 and rows[128]["hot_stream_mib"] == 130


def test_one_guest_size_draws_no_scaling_plot(tmp_path: Path) -> None:
    s = samples()
    detail = bench.as_json(bench.summarize(s), s, [], {"command": "c", "date": "d",
                                                       "repeats": 3, "xen": "4.17.7",
                                                       "machine": bench.machine()})
    assert not bench_report.scaling_plot(detail, tmp_path / "s.png")
    assert "How each cost grows" not in bench_report.markdown(detail)


def test_the_scaling_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the bench extra is not installed")
    written = bench_report.write(scaled_detail(), tmp_path)
    png = tmp_path / "results-scaling.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Host:
    """Just enough of a XenHost for run_config's bookkeeping (its commands do nothing)."""

    def run(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(args, 0, "", "")


class _Guest:
    def __init__(self, name: str) -> None:
        self.name = name

    def destroy(self) -> None:
        pass


def test_a_signal_stops_the_bench_after_the_method_under_way(monkeypatch) -> None:
    crashes: list[str] = []

    def crash(host, guest, method):
        crashes.append(method)
        bench.STOP.set()  # the signal arrives during the first crash
        return 1.5

    monkeypatch.setattr(bench, "_dom0_copy_rates", lambda host, mib: {"memcpy": 900.0})
    for name in ("start", "stop"):
        monkeypatch.setattr(bench.xenpbrd, name, lambda host, *a, **k: "")
    monkeypatch.setattr(bench.xenpbrd, "rss_mib", lambda host: 40.0)
    monkeypatch.setattr(bench, "_guest", lambda host, w, m, method: _Guest(method))
    monkeypatch.setattr(bench, "_start", lambda host, guest, method, workload: 10.0)
    monkeypatch.setattr(bench, "_crash_and_time", crash)
    bench.STOP.clear()
    try:
        samples, facts = bench.run_config(_Host(), "bare", 128, 2, lambda line: None,
                                          methods=("normal", "xl-restore"))
    finally:
        bench.STOP.clear()
    assert crashes == ["normal", "normal"]  # its repeats finish, xl-restore never starts
    assert [s.method for s in samples] == ["normal", "normal"]
    assert facts.first_boot_s == {"normal": 10.0}
