"""The API reference builds from the docstrings (docs/build_api.py, pdoc) and has a page for every module."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("pdoc") is None, reason="pdoc (requirements-test.txt) not installed")
def test_the_api_reference_builds_with_a_page_per_module(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import build_api
    finally:
        sys.path.pop(0)
    names = build_api.build(tmp_path)
    assert {"fastdfa", "fastdfa.dfa", "fastdfa.config", "fastdfa.prepare", "fastdfa.engine.intercept",
            "fastdfa.lab.data.registry"} <= set(names)
    for name in names:
        page = tmp_path / (name.replace(".", "/") + ".html")
        assert page.is_file(), name
    import fastdfa
    first_line = fastdfa.DFA.__doc__.strip().splitlines()[0]
    assert first_line.split("``")[0][:40] in (tmp_path / "fastdfa" / "dfa.html").read_text()
