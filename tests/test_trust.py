"""Claims that a user could not take on trust before: documented data, default devices, CLI input checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

from test_numerics import CASES, GOLDEN

DATA_README = GOLDEN.parent / "README.md"


def test_golden_data_readme_describes_the_file():
    """tests/data/README.md (cited by the README and numerics.py) exists and names this very file."""
    text = DATA_README.read_text()
    digest = hashlib.sha256(GOLDEN.read_bytes()).hexdigest()
    assert f"sha256: `{digest}`" in text
    assert f"{len(CASES)} cases in all" in text
    assert "copy of\n`../shared/golden/microxcaling_mx_golden.npz`" in text
    root = Path(__file__).resolve().parent.parent
    cited = [p for p in (root / "README.md", root / "lm_eval_mx" / "numerics.py") if "tests/data/README.md" in p.read_text()]
    assert len(cited) == 2
    assert "custom_cuda=True" in text  # the provenance: microxcaling's CUDA path
