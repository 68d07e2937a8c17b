"""Memory a run no longer uses goes back to the system (a big run's rendering and worker
processes start from what the run still needs, not from what its loading once held)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# in a fresh process: RSS after ~400 MB of Arrow text and ~400 MB of numpy arrays were used
# and freed, before and after give_back_memory
SCRIPT = """
import numpy as np, pyarrow as pa
from engine.data.memory import give_back_memory
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
text = pa.array([f"C{i:09d}-{i * 7:012d}" for i in range(12_000_000)])
numbers = [np.ones(1_000_000) for _ in range(50)]
kept = pa.array(np.arange(10)), np.arange(10)
del text, numbers
before = rss()
give_back_memory()
print(before, rss())
"""


def test_memory_freed_by_arrow_and_numpy_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    before, after = map(int, out.stdout.split())
    assert before - after > 300 * 2**20, (before, after)
