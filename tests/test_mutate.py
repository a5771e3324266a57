"""The mutation pass (scripts/mutate.py, the score in docs/METHOD.md) stays runnable: every mutant's
snippet occurs exactly once in the source it edits — a refactor that changes a snippet must update the
mutant, or the pass would stop at it instead of measuring anything."""

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import mutate  # noqa: E402

sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("mutant", mutate.MUTANTS, ids=lambda m: m.id)
def test_each_mutant_applies_exactly_once(mutant):
    source = (mutate.ROOT / mutant.path).read_text()
    assert source.count(mutant.old) == 1, f"{mutant.id}: its snippet occurs {source.count(mutant.old)}× in {mutant.path}"
    assert mutant.old != mutant.new
