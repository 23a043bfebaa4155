"""The campaign report: report.json, report.md and recovery.png.

``report.json`` is the record a reader (or CI) checks: faults injected, a
count per fault kind, a count per outcome, the checker's findings (lost
writes, corrupted reads), isolation findings (unaffected domains disrupted,
hypervisor or dom0 failures), and recovery times (p50, p99, max).
``report.md`` says the same for people, and ``recovery.png`` plots every
fault's recovery time (log scale, one dot per fault, coloured by outcome).

The PNG is written with the standard library (zlib + struct): one chart does
not justify a plotting dependency.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib

OUTCOMES = ("recovered_transparently", "recovered_with_guest_visible_error", "guest_crashes",
            "unrecovered")
COLOURS = {"recovered_transparently": (40, 150, 60), "recovered_with_guest_visible_error": (230, 150, 20),
           "guest_crashes": (200, 30, 30), "unrecovered": (120, 0, 160)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(records: list[dict], findings: dict, elapsed_s: float, meta: dict) -> dict:
    per_kind: dict[str, int] = {}
    per_type: dict[str, int] = {}
    outcomes = {o: 0 for o in OUTCOMES}
    rec = []
    for r in records:
        per_kind[r["kind"]] = per_kind.get(r["kind"], 0) + 1
        per_type[r["fault"]] = per_type.get(r["fault"], 0) + 1
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        if r.get("recovery_ms") is not None and r["outcome"] != "unrecovered":
            rec.append(r["recovery_ms"])
    out = {
        "faults_injected": len(records),
        "per_kind": per_kind,
        "per_fault": per_type,
        **outcomes,
        "lost_writes": findings.get("lost_writes", 0),
        "corrupted_reads": findings.get("corrupted_reads", 0),
        "unaffected_domain_disruptions": findings.get("unaffected_domain_disruptions", 0),
        "hypervisor_or_dom0_failures": findings.get("hypervisor_or_dom0_failures", 0),
        "recovery_ms": {"p50": _r(percentile(rec, 0.5)), "p99": _r(percentile(rec, 0.99)),
                        "max": _r(max(rec) if rec else None), "samples": len(rec)},
        "elapsed_s": round(elapsed_s, 1),
        "faults_per_minute": round(len(records) / (elapsed_s / 60), 1) if elapsed_s else 0,
        "checker": findings,
        **meta,
    }
    out["passed"] = not (out["lost_writes"] or out["corrupted_reads"] or out["guest_crashes"]
                         or out["unrecovered"] or out["unaffected_domain_disruptions"]
                         or out["hypervisor_or_dom0_failures"])
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def write(directory: str, summary: dict, records: list[dict]) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, n) for n in ("report.json", "report.md", "recovery.png")]
    with open(paths[0], "w") as f:
        json.dump({**summary, "faults": records}, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown(summary, records))
    with open(paths[2], "wb") as f:
        f.write(plot(records))
    return paths


def markdown(s: dict, records: list[dict]) -> str:
    rm = s["recovery_ms"]
    lines = [
        "# microxen fault-injection campaign",
        "",
        f"**{'PASSED' if s['passed'] else 'FAILED'}**: {s['faults_injected']} faults in "
        f"{s['elapsed_s']} s ({s['faults_per_minute']} faults/minute), seed {s.get('seed')}.",
        "",
        "| outcome | count |", "| --- | ---: |",
    ]
    for key in (*OUTCOMES, "lost_writes", "corrupted_reads", "unaffected_domain_disruptions",
                "hypervisor_or_dom0_failures"):
        lines.append(f"| {key} | {s[key]} |")
    lines += ["", f"Recovery (injection until every guest completes I/O again after the fault "
                  f"ended): p50 {rm['p50']} ms, p99 {rm['p99']} ms, max {rm['max']} ms "
                  f"({rm['samples']} samples).", "",
              "| fault | injected | p50 ms | max ms | not transparent |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in sorted(s["per_fault"]):
        rs = [r for r in records if r["fault"] == name]
        times = [r["recovery_ms"] for r in rs if r.get("recovery_ms") is not None]
        bad = sum(r["outcome"] != "recovered_transparently" for r in rs)
        lines.append(f"| {name} | {len(rs)} | {_r(percentile(times, 0.5))} | "
                     f"{_r(max(times) if times else None)} | {bad} |")
    notes = s.get("checker", {}).get("notes", [])
    if notes:
        lines += ["", "## Checker notes", ""] + [f"- {n}" for n in notes[:50]]
    lines += ["", "recovery.png: one dot per fault in injection order; y is recovery time on a "
                  "log scale with grid lines at 10 ms, 100 ms, 1 s and 10 s; green transparent, "
                  "orange guest-visible error, red guest crash, purple unrecovered.", ""]
    return "\n".join(lines)


def plot(records: list[dict], width: int = 900, height: int = 320) -> bytes:
    """A scatter plot of recovery times as a PNG (RGB, no text)."""
    px = bytearray(b"\xff" * (width * height * 3))
    left, bottom, top = 20, 20, 10
    h = height - bottom - top

    def put(x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            px[i:i + 3] = bytes(c)

    def ypos(ms: float) -> int:
        v = math.log10(max(ms, 1.0)) / 5.0      # 1 ms .. 100 s
        return height - bottom - int(min(1.0, v) * h)
    for ms in (10, 100, 1000, 10000):
        y = ypos(ms)
        for x in range(left, width):
            put(x, y, (215, 215, 215) if ms != 1000 else (160, 160, 160))
    for y in range(top, height - bottom + 1):
        put(left, y, (0, 0, 0))
    for x in range(left, width):
        put(x, height - bottom, (0, 0, 0))
    n = max(1, len(records))
    for i, r in enumerate(records):
        ms = r.get("recovery_ms")
        if ms is None:
            ms = 100000
        x = left + 2 + int(i * (width - left - 6) / n)
        y = ypos(ms)
        c = COLOURS.get(r["outcome"], (0, 0, 0))
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                put(x + dx, y + dy, c)
    raw = b"".join(b"\x00" + bytes(px[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
