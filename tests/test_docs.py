"""docs/usage.md agrees with the code: its option table is DFAConfig's fields with their defaults, every
command-line flag is documented, the documented signatures are the code's, and the Hugging Face Trainer
example runs as written."""

import ast
import dataclasses
import inspect
import os
import re

import pytest

import fastdfa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE = os.path.join(ROOT, "docs", "usage.md")


def _between(marker: str, end: str | None = None) -> str:
    text = open(USAGE).read()
    start = text.index(f"<!-- {marker} -->") + len(marker) + 8
    return text[start:text.index(end, start)] if end else text[start:]


def _options_table() -> dict[str, str]:
    """option -> the default column, from the table between the options-table markers."""
    rows = {}
    for line in _between("options-table", "<!-- /options-table -->").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def test_the_option_table_is_dfaconfigs_fields_with_their_defaults():
    table = _options_table()
    fields = {f.name: f.default for f in dataclasses.fields(fastdfa.DFAConfig)}
    assert list(table) == list(fields), "docs/usage.md's option table must list DFAConfig's fields, in order"
    for name, default in fields.items():
        assert ast.literal_eval(table[name]) == default, (name, table[name], default)


def test_the_documented_signature_is_the_wrappers():
    params = inspect.signature(fastdfa.DFA.__init__).parameters
    assert list(params) == ["self", "model", "config", "sites", "example_input", "options"]
    assert "fastdfa.DFA(model, config=None, *, sites=None, example_input=None, **options)" in open(USAGE).read()


def test_the_documented_prepare_signature_is_the_codes():
    params = inspect.signature(fastdfa.prepare).parameters
    assert list(params) == ["model", "config", "targets", "exclude", "sites", "example_input", "options"]
    text = " ".join(open(USAGE).read().split())
    assert ('fastdfa.prepare(model, config=None, *, targets="all-linear", exclude=(), sites=None, '
            'example_input=None, **options)') in text


def _cli_flags() -> dict[str, list[str]]:
    """subcommand -> its long flags (help aside), from the CLI's own parser."""
    import argparse

    from fastdfa.lab.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: [next(o for o in a.option_strings if o.startswith("--")) for a in parser._actions
                   if any(o.startswith("--") for o in a.option_strings) and a.dest != "help"]
            for name, parser in sub.choices.items()}


def test_every_command_line_flag_is_documented():
    text = open(USAGE).read()
    flags = _cli_flags()
    assert len(flags["train"]) > 20 and "--feedback-layout" in flags["train"]  # the reader sees the parser
    missing = {name: [f for f in found if not re.search(re.escape(f) + r"(?![\w-])", text)]
               for name, found in flags.items()}
    assert not any(missing.values()), f"flags with no mention in docs/usage.md: {missing}"


def test_the_hugging_face_trainer_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    block = re.search(r"```python\n(.*?)```", _between("hf-trainer-example"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "docs/usage.md (hf-trainer-example)", "exec"), namespace)
    again, model = namespace["again"], namespace["model"]
    assert again.dfa_config == model.dfa_config and again.dfa_config.head == "lm_head"
    assert os.path.exists(tmp_path / "gpt2-dfa" / "hf" / "fastdfa_config.json")
    assert os.path.exists(tmp_path / "gpt2-dfa" / "saved" / "model.safetensors")
