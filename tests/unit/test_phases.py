"""Phase bookkeeping: validity, fallback chain, crash-loop guard (pure logic)."""

from __future__ import annotations

import pytest

from xenpbr.phases import (
    CrashLoopGuard,
    DomainPhases,
    Fingerprint,
    ImageInfo,
    plan_recovery,
)

PHASES = ("kernel", "services", "app")


def fp(**changes) -> Fingerprint:
    base = dict(kernel="k1", ramdisk="r1", cmdline="console=hvc0", memory_mib=128, vcpus=1,
                disks=(("xvda", "root.img", "snapshot"),), phases=PHASES, identity="v1")
    base.update(changes)
    return Fingerprint(**base)


def img(phase: str, fingerprint: str = "F", t: float = 0.0, ok: bool = True) -> ImageInfo:
    return ImageInfo(f"{phase}-{t:g}", phase, fingerprint, t, ok)


def phases_of(plan) -> list[str]:
    return [c.image.phase if c.image else "reboot" for c in plan.candidates]


@pytest.mark.parametrize("field,value", [("kernel", "k2"), ("cmdline", "quiet"),
                                         ("memory_mib", 256), ("vcpus", 2),
                                         ("disks", (("xvda", "other.img", "snapshot"),)),
                                         ("phases", ("kernel", "app")), ("identity", "v2")])
def test_each_fingerprint_input_changes_the_digest(field, value) -> None:
    assert fp().digest() != fp(**{field: value}).digest()
    assert fp().differences(fp(**{field: value})) == [field]


def test_digest_is_stable() -> None:
    assert fp().digest() == fp().digest() and len(fp().digest()) == 32


def test_plan_is_deepest_valid_first_then_earlier_then_reboot() -> None:
    images = [img("kernel", t=1), img("app", t=3), img("services", t=2)]
    plan = plan_recovery(images, PHASES, "F", CrashLoopGuard())
    assert phases_of(plan) == ["app", "services", "kernel", "reboot"]
    assert plan.first.reason == "deepest valid image"


def test_stale_and_corrupt_images_are_skipped_with_reasons() -> None:
    images = [img("app", "OLD", 3), img("services", t=2, ok=False), img("kernel", t=1)]
    plan = plan_recovery(images, PHASES, "F", CrashLoopGuard())
    assert phases_of(plan) == ["kernel", "reboot"]
    assert any("stale fingerprint" in s for s in plan.skipped)
    assert any("failed verification" in s for s in plan.skipped)


def test_no_image_means_normal_reboot() -> None:
    plan = plan_recovery([], PHASES, "F", CrashLoopGuard())
    assert phases_of(plan) == ["reboot"] and plan.first.is_normal_reboot


def test_images_of_unknown_phases_are_ignored() -> None:
    assert phases_of(plan_recovery([img("gone")], PHASES, "F", CrashLoopGuard())) == ["reboot"]


def test_newest_image_of_a_phase_wins() -> None:
    plan = plan_recovery([img("app", t=1), img("app", t=5)], PHASES, "F", CrashLoopGuard())
    assert plan.first.image.created_at == 5 and len(plan.candidates) == 2


def test_crash_loop_falls_back_one_phase_per_quick_crash_then_reboots() -> None:
    d = DomainPhases("g", PHASES, "F")
    for p, t in (("kernel", 1), ("services", 2), ("app", 3)):
        d.record_image(img(p, t=t))
    firsts = []
    now = 100.0
    for _ in range(5):
        plan = d.plan(now)
        firsts.append(phases_of(plan)[0])
        d.recovered(now + 1, via_image=not plan.first.is_normal_reboot)
        now += 10  # crashes again 9 s after each recovery: inside the 60 s window
    assert firsts == ["app", "services", "kernel", "reboot", "app"]


def test_surviving_the_window_resets_the_guard() -> None:
    d = DomainPhases("g", PHASES, "F")
    d.record_image(img("app", t=1))
    d.record_image(img("services", t=1))
    d.plan(100.0)
    d.recovered(101.0, via_image=True)
    assert phases_of(d.plan(110.0))[0] == "services"  # quick crash
    d.recovered(111.0, via_image=True)
    assert phases_of(d.plan(1000.0))[0] == "app"  # survived 889 s: back to the deepest


def test_generation_counts_phase_based_reboots_only() -> None:
    d = DomainPhases("g", PHASES, "F")
    d.recovered(1.0, via_image=True)
    d.recovered(2.0, via_image=False)
    d.recovered(3.0, via_image=True)
    assert d.generation == 2


def test_boundary_skips_a_phase_already_known() -> None:
    d = DomainPhases("g", PHASES, "F")
    assert d.boundary_decision("services", "F") == "capture"
    d.record_image(img("services"))
    assert d.boundary_decision("services", "F") == "skip"
    assert d.boundary_decision("services", "NEW") == "capture"


def test_forget_drops_a_phase_and_everything_after_it() -> None:
    d = DomainPhases("g", PHASES, "F")
    for p in PHASES:
        d.record_image(img(p))
    dropped = d.forget("services")
    assert sorted(i.phase for i in dropped) == ["app", "services"]
    assert list(d.images) == ["kernel"]
    assert [i.phase for i in d.forget()] == ["kernel"] and not d.images


def test_operator_can_cap_the_phase() -> None:
    images = [img("kernel", t=1), img("services", t=2), img("app", t=3)]
    plan = plan_recovery(images, PHASES, "F", CrashLoopGuard(), max_phase="services")
    assert phases_of(plan) == ["services", "kernel", "reboot"]
    assert any("deeper than the requested phase services" in s for s in plan.skipped)


# -- per-image failure history (issue 13, point 3) ------------------------------------------


def three_images() -> DomainPhases:
    d = DomainPhases("g", PHASES, "F")
    for p, t in (("kernel", 1), ("services", 2), ("app", 3)):
        d.record_image(img(p, t=t))
    return d


def crash_then_recover(d: DomainPhases, now: float, health=(120.0, 2)) -> str:
    """A crash at ``now`` (crash-loop window 5 s: never tripped here); returns the
    phase recovered from (or "reboot") and records the recovery one second later."""
    plan = d.plan(now, crash_loop=(5.0, 3), health=health)
    d.recovered(now + 1, via_image=not plan.first.is_normal_reboot, image=plan.first.image)
    return phases_of(plan)[0]


def test_restores_crashing_before_healthy_abandon_the_image_whatever_the_gap() -> None:
    d = three_images()
    now, firsts = 0.0, []
    for _ in range(8):
        firsts.append(crash_then_recover(d, now))
        now += 150  # each cycle far longer than the crash-loop window (as in the field)
    assert firsts == ["app", "app", "services", "services", "kernel", "kernel", "reboot",
                      "reboot"]
    assert [d.images[p].failures for p in PHASES] == [2, 2, 2]
    assert d.guard.quick_crashes == 0  # the crash-loop guard never saw a quick crash


def test_the_history_says_why_an_image_was_abandoned() -> None:
    d = three_images()
    crash_then_recover(d, 0.0)
    d.guest_ready(d.generation, 10.0)  # ready, then crashed 50 s later: not yet healthy
    crash_then_recover(d, 60.0)
    plan = d.plan(200.0, health=(120.0, 2))
    assert plan.skipped[0].startswith("app-3 (app): restore 2 of 2 crashed before healthy")
    assert plan.skipped[0].endswith("; image abandoned")
    assert "app-3 (app): abandoned: 2 restores crashed before healthy" in plan.skipped
    assert phases_of(plan)[0] == "services"
    d.recovered(201.0, via_image=True, image=plan.first.image)
    assert d.plan(900.0, health=(120.0, 2)).skipped[0] == (
        "services-2 (services): restore 1 of 2 crashed before healthy (never reported ready)")


def test_a_guest_that_proved_healthy_clears_the_image() -> None:
    d = three_images()
    crash_then_recover(d, 0.0)
    crash_then_recover(d, 100.0)  # no ready: one failure
    assert d.images["app"].failures == 1
    assert d.guest_ready(d.generation + 5, 110.0) is False  # another generation: ignored
    assert d.guest_ready(d.generation, 110.0) is True
    assert crash_then_recover(d, 110.0 + 120.0) == "app"  # stayed up 120 s after ready
    assert d.images["app"].failures == 0


def test_an_operator_reboot_does_not_count_against_the_image() -> None:
    d = three_images()
    crash_then_recover(d, 0.0)
    plan = d.plan(50.0, crashed=False, health=(120.0, 1))
    assert d.images["app"].failures == 0 and phases_of(plan)[0] == "app"


def test_a_fresh_image_of_the_phase_starts_with_no_failures() -> None:
    d = three_images()
    for now in (0.0, 150.0, 300.0):
        crash_then_recover(d, now)
    assert d.images["app"].abandoned(2)
    assert d.boundary_decision("app", "F") == "capture"  # a fresh boot replaces it
    d.record_image(ImageInfo("app-new", "app", "F", 400.0))
    assert d.images["app"].failures == 0 and d.images["app"].replaced == "app-3"
    assert d.boundary_decision("app", "F") == "skip"


def test_replacing_a_usable_image_is_refused_in_the_same_run_and_too_soon() -> None:
    d = three_images()  # the app image was created at t=3 (wall clock)
    assert d.replacement("app", passed=True, now=10_000.0) == "out-of-order"
    assert d.replacement("app", passed=False, now=3.0 + 60) == "rate-limited"
    assert d.replacement("app", passed=False, now=3.0 + 300) is None
    assert d.replacement("nothing-yet", passed=True, now=10.0) is None
    d.mark_unusable("app-3")
    assert d.replacement("app", passed=True, now=10.0) is None  # no usable image to keep


def test_a_run_restored_from_a_phase_has_passed_it_and_the_earlier_ones() -> None:
    d = three_images()
    assert not d.passed_by_restore("kernel")
    d.recovered(1.0, via_image=True, image=d.images["services"])
    assert d.passed_by_restore("kernel") and d.passed_by_restore("services")
    assert not d.passed_by_restore("app")


def test_an_abandoned_image_is_reimaged_by_a_fresh_boot_only() -> None:
    d = three_images()
    for now in (0.0, 150.0, 300.0):
        crash_then_recover(d, now)
    assert d.boundary_decision("app", "F", restored_run=True) == "skip"
    assert d.boundary_decision("app", "F", restored_run=False) == "capture"
