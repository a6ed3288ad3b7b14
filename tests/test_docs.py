"""docs/INTEGRATION.md: every code block is Python and runs, in order, on every rank of a 4-rank group (its asserts
are part of this test), so the guide cannot drift from the API."""
import traceback
from pathlib import Path

import pytest

import docs_fns

pytestmark = pytest.mark.timeout(180)
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "INTEGRATION.md"


def test_every_block_of_the_guide_is_python():
    blocks = docs_fns.code_blocks(GUIDE)
    assert len(blocks) >= 5
    assert [lang for _, lang, _ in blocks] == ["python"] * len(blocks)


def test_the_guide_runs_on_four_ranks(pools):
    results = pools(4).run(docs_fns.run_markdown, str(GUIDE))
    for names in results:  # the blocks ran to their end on every rank
        assert {"result", "split", "served", "prefix_index"} <= set(names)


def test_a_broken_snippet_fails(tmp_path):
    """The harness reports a failing block with the Markdown file's line number."""
    doc = tmp_path / "broken.md"
    doc.write_text("text\n\n```python\nx = 1\n```\n\nmore\n\n```python\nassert x == 2, 'wrong'\n```\n")
    with pytest.raises(AssertionError, match="wrong") as info:
        docs_fns.run_markdown(0, 1, str(doc))
    frames = traceback.extract_tb(info.value.__traceback__)
    assert (str(doc), 10) in [(f.filename, f.lineno) for f in frames]
