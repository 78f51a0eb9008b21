"""The API reference, generated from the docstrings with pdoc (pinned in requirements-test.txt):

    python docs/build_api.py [OUT]      # default OUT: docs/api (not committed: build it)

Every module of the fastdfa package is documented (found by walking the package, so a new module gets its
page without an edit here); tests/test_api_docs.py builds it in CI and checks every module has a page.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

SKIP = ("fastdfa.__main__",)  # runs the CLI on import


def modules() -> list[str]:
    import fastdfa

    names = ["fastdfa"]
    for info in pkgutil.walk_packages(fastdfa.__path__, "fastdfa."):
        if info.name not in SKIP:
            names.append(info.name)
    return names


def build(out: Path) -> list[str]:
    """Write the reference into ``out``; the module names documented."""
    import pdoc

    names = modules()
    for name in names:  # an import error names the module, not pdoc's internals
        importlib.import_module(name)
    pdoc.pdoc(*names, output_directory=out)
    return names


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "api")
    print(f"documented {len(build(target))} modules in {target}")
