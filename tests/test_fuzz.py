"""A fixed sample of tools/fuzz.py: hostile and mistaken input at every entry point ends as the pack's own error
(or is accepted), never as another exception, a hang, a memory blow-up, a lost or an escaped file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz  # noqa: E402


def test_fixed_sample_of_hostile_inputs():
    per_kind = 60
    counts, examples = fuzz.run(per_kind * len(fuzz.KINDS), memory_gb=4.0, timeout=30.0, report=None)
    failures = {key: n for key, n in counts.items() if key.split(":")[1] in fuzz.FAILURES}
    assert not failures, (failures, examples)
    for kind in fuzz.KINDS:  # every entry point was reached, and refused something
        assert sum(n for key, n in counts.items() if key.startswith(kind + ":")) == per_kind
    assert all(counts.get(f"{kind}:refused", 0) or counts.get(f"{kind}:oserror", 0) for kind in fuzz.KINDS
               if kind not in ("image", "cli")), counts
