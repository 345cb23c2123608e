"""Fixtures: a tiny masked diffusion LM built by the zoo's own code on a few stdlib files."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from test_zoo import TINY  # noqa: E402

from interlayer import zoo  # noqa: E402

TINY_MDLM = replace(TINY, name="tiny-mdlm", kind="mdlm", corpus="stdlib:code", steps=30, context_len=32)


@pytest.fixture(scope="session")
def tiny_mdlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a tiny ModernBERT MDLM (vocab 300 + [MASK], 1 block, 32 positions)."""
    return zoo.build(TINY_MDLM, root=tmp_path_factory.mktemp("zoo"), progress=False)
