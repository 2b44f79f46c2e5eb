"""SIGKILL a real training script mid-run; the resumed run ends where the uninterrupted one does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "plain_train.py"
STEPS = 60


def batches(out: Path) -> dict[int, list[int]]:
    rows = [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["batch"] for row in rows}  # a replayed step overwrites the killed run's


def last_step(out: Path) -> int:
    return max(batches(out), default=0) if (out / "batches.jsonl").exists() else 0


def test_sigkill_mid_run_then_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(full), "--steps", str(STEPS)], check=True)

    # The victim would run 600 steps; it is killed once it has logged step 25 (after the checkpoint of
    # step 20), wherever it is, workers included.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(killed), "--steps", str(10 * STEPS)])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and last_step(killed) < 25:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    seen = last_step(killed)
    assert 25 <= seen < 10 * STEPS, seen

    saved = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]  # the last save before the kill
    assert 20 <= saved <= seen, (saved, seen)
    logged = len((killed / "batches.jsonl").read_text().splitlines())
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(killed), "--steps", str(STEPS), "--resume"], check=True
    )
    # it resumed, not restarted: the new process logged exactly the steps after the checkpoint
    appended = (killed / "batches.jsonl").read_text().splitlines()[logged:]
    assert [json.loads(line)["step"] for line in appended] == list(range(saved + 1, STEPS + 1))
    assert batches(killed) == batches(full)
    assert json.loads((killed / "final.json").read_text()) == json.loads((full / "final.json").read_text())
    # resuming a finished run ends at once with the same result (it ran on forever: the sampler never
    # ends and the loop only checked for the last step after a step)
    before = (full / "batches.jsonl").read_text()
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(full), "--steps", str(STEPS), "--resume"],
        check=True,
        timeout=120,
    )
    assert (full / "batches.jsonl").read_text() == before
    assert json.loads((full / "final.json").read_text()) == json.loads((killed / "final.json").read_text())
