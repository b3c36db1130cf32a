"""Run a command and watch it: output streamed (and logged), GPU memory, host RSS of its process tree, disk of OUT.

- GPU: ``nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500`` in the background
  (memory the driver reports per GPU, every process on it: the CUDA contexts and allocator caches included,
  unlike ``torch.cuda.max_memory_allocated``); none without nvidia-smi.
- host: the sum of VmRSS over the command's process and its descendants (torchrun workers), read from /proc
  every ``interval`` seconds (shared pages count once per process: an upper bound).
- disk: bytes allocated under OUT (``st_blocks``), every ``4 x interval``.
- phases: every sample is labelled with the stage of the next ``OUT/metrics.jsonl`` line written after it
  (``stage1``, ``selection`` -> probes, ``stage2``, ``stage3``; after the last line: ``finish``), so the peaks
  can be read per phase.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
GIB = 1024 ** 3
PHASE_OF_STAGE = {"stage1": "stage1", "selection": "probes", "stage2": "stage2", "stage3": "stage3"}


def tree_rss(root: int) -> int:
    """Bytes of resident memory of ``root`` and its descendants (from /proc; 0 where /proc is missing)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
        todo += children.get(pid, [])
    return total


def disk_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


class Monitor:
    """Samples GPU memory, host RSS and OUT's disk use while a command runs (see the module docstring)."""

    def __init__(self, out: Path, interval: float = 0.5):
        self.out, self.interval = out, interval
        self.samples: list[dict[str, Any]] = []  # t, rss, disk, gpu (index -> MiB)
        self.lines: list[tuple[float, str]] = []  # (arrival time, stage) of metrics.jsonl lines
        self._gpu: dict[int, int] = {}
        self._stop = threading.Event()
        self._smi: subprocess.Popen | None = None
        self.gpu_baseline = self.query_gpu()

    @staticmethod
    def query_gpu() -> dict[int, int] | None:
        """MiB used per GPU now (None without nvidia-smi)."""
        if shutil.which("nvidia-smi") is None:
            return None
        proc = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
        return dict(tuple(int(x) for x in line.split(",")) for line in proc.stdout.strip().splitlines() if "," in line) or None

    def _read_smi(self) -> None:
        for line in self._smi.stdout:
            try:
                index, used = (int(x) for x in line.split(","))
            except ValueError:
                continue
            self._gpu[index] = max(self._gpu.get(index, 0), used)  # max since the last sample

    def _read_metrics(self, offset: int) -> int:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return offset
        if path.stat().st_size < offset:  # a new file (the run replaced OUT)
            offset = 0
        with open(path) as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        now = time.perf_counter()
        for line in complete.splitlines():
            try:
                stage = json.loads(line).get("stage")
            except json.JSONDecodeError:
                continue
            if stage:
                self.lines.append((now, stage))
        return offset + len(complete.encode())

    def _loop(self, pid: int) -> None:
        offset, n = 0, 0
        while not self._stop.is_set():
            gpu, self._gpu = self._gpu, {}
            sample = {"t": time.perf_counter(), "rss": tree_rss(pid), "gpu": gpu}
            if n % 4 == 0 and self.out.exists():
                sample["disk"] = disk_bytes(self.out)
            offset = self._read_metrics(offset)
            self.samples.append(sample)
            n += 1
            self._stop.wait(self.interval)
        self._read_metrics(offset)

    def run(self, cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> int:
        """Run ``cmd`` (stdout and stderr streamed here and into ``log``), sampling until it exits; its exit code."""
        if self.gpu_baseline is not None:
            self._smi = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                                          f"-lms={int(self.interval * 1000)}"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read_smi, daemon=True).start()
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        with open(log, "ab") as sink:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            sampler = threading.Thread(target=self._loop, args=(proc.pid,), daemon=True)
            sampler.start()
            killer = threading.Timer(timeout, self._kill, args=(proc, timeout))
            killer.start()
            try:
                while chunk := os.read(proc.stdout.fileno(), 65536):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    sink.write(chunk)
                    sink.flush()
                rc = proc.wait()
            finally:
                killer.cancel()
                self._stop.set()
                sampler.join(timeout=10)
                if self._smi is not None:
                    self._smi.terminate()
        self.seconds = time.perf_counter() - t0
        return rc

    @staticmethod
    def _kill(proc: subprocess.Popen, timeout: float) -> None:
        """Past --timeout: the command's process group (torchrun and its workers) is killed."""
        print(f"\nkilling the command after {timeout:.0f} s (--timeout)", flush=True)
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            proc.kill()

    def peaks(self) -> dict[str, dict[str, float | None]]:
        """Per phase (and ``all``): peak GPU GiB (the busiest GPU), peak host RSS GiB, peak disk GiB of OUT."""
        out: dict[str, dict[str, float | None]] = {}
        for s in self.samples:
            later = next((stage for t, stage in self.lines if t >= s["t"]), None)
            phase = PHASE_OF_STAGE.get(later, later or "finish") if self.lines else "all"
            for key in (phase, "all"):
                rec = out.setdefault(key, {"gpu_gib": None, "host_gib": 0.0, "disk_gib": None})
                if s["gpu"]:
                    rec["gpu_gib"] = max(rec["gpu_gib"] or 0.0, max(s["gpu"].values()) / 1024)
                rec["host_gib"] = max(rec["host_gib"], s["rss"] / GIB)
                if "disk" in s:
                    rec["disk_gib"] = max(rec["disk_gib"] or 0.0, s["disk"] / GIB)
        return out
