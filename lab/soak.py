"""`python run.py bench --soak`: the browser server under attack, measured. `run.py serve`
runs in a subprocess (its memory and its GIL are its own); a well-behaved conversation asks
the same question alone, then beside a fuzzing client and connection churn (lab/attack.py);
then the server's memory over many session open/close cycles. Loopback only; every loop is
bounded and every wait has a deadline."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np

from app import protocol as P
from speech.constants import SAMPLE_RATE

from .attack import FuzzReport, churn, fuzz, p95, question_audio, summary, talk, wait_idle


@dataclass(frozen=True)
class SoakOptions:
    turns: int = 8                 # well-behaved turns, alone and then under attack
    churn: int = 100               # connection churns during the attacked phase
    fuzz_rounds: int = 3           # passes over every attack during the attacked phase
    cycles: int = 600              # session open/close cycles for the memory check
    model: str | None = None       # fusion checkpoint; None: the shipped one; "random": untrained
    mid_reply: bool = True         # the fuzzer also asks questions and leaves mid-reply

    def __post_init__(self):
        if min(self.turns, self.churn, self.fuzz_rounds, self.cycles) < 1:
            raise ValueError("turns, churn, fuzz rounds and cycles must each be >= 1")


class ServerProcess:
    """`run.py serve` on 127.0.0.1 (an ephemeral port) in a subprocess."""

    def __init__(self, model: str | None, max_sessions: int = 16):
        import subprocess
        import sys
        from pathlib import Path
        root = Path(__file__).resolve().parents[1]
        args = [sys.executable, str(root / "run.py"), "serve", "--port", "0",
                "--max-sessions", str(max_sessions)]
        args += ["--random"] if model == "random" else (["--model", model] if model else [])
        self.proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 300
        self.url = None
        for line in self.proc.stdout:                       # until it prints its address
            if "is serving on " in line:
                self.url = line.split("is serving on ", 1)[1].split()[0]
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("the server did not start (run `python run.py serve` to see why)")
        self.ws_url = self.url.replace("http://", "ws://").rstrip("/") + "/ws"

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def stop(self) -> None:
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)


async def _settle(server: ServerProcess) -> float:
    """Server RSS once idle (its sessions closed and a moment to release memory)."""
    await wait_idle(server.url)
    await asyncio.sleep(2.0)
    return server.rss_mb()


async def _soak(server: ServerProcess, o: SoakOptions, question: np.ndarray,
                log=print) -> dict:
    # warm-up: the first session pays one-time costs (lazy imports, allocator pools)
    await talk(server.ws_url, question, 1)
    await churn(server.ws_url, 20)
    base_mb = await _settle(server)
    log(f"baseline: server RSS {base_mb:.0f} MB")
    alone = await talk(server.ws_url, question, o.turns)
    log(f"alone: {summary(alone.latencies)}")
    limits = {k: min(v, 4 * 1024 * 1024 - 1) for k, v in P.DEFAULT_LIMITS.items()}
    busy = asyncio.create_task(talk(server.ws_url, question, o.turns))
    stop_at = time.monotonic() + 600

    span = o.turns * len(question) / SAMPLE_RATE          # the attacks run all along the talk

    async def fuzzer():
        total = FuzzReport()
        for k in range(o.fuzz_rounds):
            rep = await fuzz(server.ws_url, limits, 4 * 1024 * 1024, seed=k,
                             question=question if o.mid_reply else None)
            for case, n in rep.cases.items():
                total.cases[case] = total.cases.get(case, 0) + n
            total.unanswered += rep.unanswered
            total.internal += rep.internal
            await asyncio.sleep(span / o.fuzz_rounds)
        return total

    async def attackers():
        fz = asyncio.create_task(fuzzer())
        churned = await churn(server.ws_url, o.churn, every=span / o.churn)
        return await fz, churned
    attack = asyncio.create_task(attackers())
    loaded = await busy
    fz, churned = await attack
    assert time.monotonic() < stop_at
    log(f"with fuzz + churn: {summary(loaded.latencies)}")
    log(f"  fuzz: {sum(fz.cases.values())} attacks, {len(fz.unanswered)} unanswered, "
        f"{fz.internal} internal errors; churn: {churned} sessions")
    after_load_mb = await _settle(server)
    t0 = time.monotonic()
    opened = 0
    for k in range(0, o.cycles, 50):
        opened += await churn(server.ws_url, min(50, o.cycles - k), seed=k)
    end_mb = await _settle(server)
    log(f"memory: baseline {base_mb:.0f} MB, after the attacked phase {after_load_mb:.0f} MB, "
        f"after {opened} more open/close cycles ({time.monotonic() - t0:.0f} s) {end_mb:.0f} MB")
    return {
        "turns": o.turns, "alone": alone.latencies, "loaded": loaded.latencies,
        "replies_alone": len(alone.metrics), "replies_loaded": len(loaded.metrics),
        "p95_alone_ms": p95(alone.latencies) * 1000, "p95_loaded_ms": p95(loaded.latencies) * 1000,
        "fuzz_attacks": sum(fz.cases.values()), "fuzz_unanswered": fz.unanswered,
        "fuzz_internal": fz.internal, "churned": churned, "cycles": opened,
        "rss_baseline_mb": base_mb, "rss_after_attack_mb": after_load_mb, "rss_end_mb": end_mb,
    }


def run_soak(options: SoakOptions = SoakOptions(), json_path: str | None = None) -> dict:
    from app.host import cpu_name
    question = question_audio()
    server = ServerProcess(options.model)
    try:
        report = asyncio.run(_soak(server, options, question))
    finally:
        server.stop()
    report["hardware"] = cpu_name()
    report["model"] = options.model or "shipped"
    d = report["p95_loaded_ms"] - report["p95_alone_ms"]
    grew = report["rss_end_mb"] - report["rss_baseline_mb"]
    report["verdict"] = {
        "every_reply": report["replies_loaded"] == report["replies_alone"] == options.turns,
        "p95_within_100ms": d <= 100, "memory_within_100mb": grew <= 100}
    print(f"\nsoak on {report['hardware']} ({report['model']} model):\n"
          f"  replies: {report['replies_alone']}/{options.turns} alone, "
          f"{report['replies_loaded']}/{options.turns} under fuzz + {report['churned']} churns\n"
          f"  latency p95: {report['p95_alone_ms']:.0f} ms alone, {report['p95_loaded_ms']:.0f} ms "
          f"under attack ({d:+.0f} ms; target +100 ms)\n"
          f"  server memory: {report['rss_baseline_mb']:.0f} MB -> {report['rss_end_mb']:.0f} MB "
          f"after {report['cycles']} open/close cycles ({grew:+.0f} MB; target +100 MB)")
    if json_path:
        from pathlib import Path
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    return report
