"""``python -m fastdfa``'s messages name the flag, the value and what would be valid (Reliability 3, item 7)."""

import argparse

import pytest

from fastdfa.lab import cli
from fastdfa.lab.cli import build_parser, dataset_spec, low_accuracy_hint, main
from fastdfa.lab.train import TrainConfig


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _refused(capsys, argv: list[str]) -> str:
    """argparse's exit (code 2) and its message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


BAD_NUMBERS = [  # (argv, flag, value, what the message says is valid)
    (["train"], "--epochs", "-1", "positive integer"),
    (["train"], "--batch-size", "0", "positive integer"),
    (["train"], "--epochs", "2.5", "positive integer"),
    (["train"], "--train-samples", "0", "positive integer"),
    (["train"], "--context", "0", "positive integer"),
    (["train"], "--check-every", "0", "positive integer"),
    (["train"], "--threads", "0", "at least 1"),
    (["train"], "--lr", "-0.1", "positive number"),
    (["train"], "--lr", "nan", "positive number"),
    (["train"], "--weight-decay", "-1", "non-negative"),
    (["train"], "--feedback-lr", "0", "positive number"),
    (["train"], "--seed", "x", "integer"),
    (["train"], "--calibrate-every", "-1", "non-negative integer"),
    (["train"], "--calibrate-below", "2", "[-1, 1]"),
    (["train"], "--hidden", "256,,256", "positive widths"),
    (["train"], "--hidden", "256,0", "positive widths"),
    (["train"], "--hidden", "256,", "positive widths"),
    (["compare"], "--epochs", "0", "positive integer"),
    (["compare"], "--timing-rounds", "0", "positive integer"),
    (["finetune"], "--batch-size", "-3", "positive integer"),
    (["finetune"], "--pretrain-epochs", "0", "positive integer"),
    (["finetune"], "--seeds", "0,,1", "integers"),
    (["finetune"], "--max-len", "1", ">= 2"),
    (["finetune"], "--align-every-steps", "-1", "non-negative integer"),
    (["bench"], "--rounds", "0", "positive integer"),
    (["bench"], "--threads", "-2", "positive integer"),
    (["bench", "--pipeline"], "--stages", "1", ">= 2"),
    (["bench", "--pipeline"], "--micro-batches", "0", "positive integer"),
]


@pytest.mark.parametrize("head,flag,value,valid", BAD_NUMBERS,
                         ids=[f"{h[0]} {f} {v}" for h, f, v, _ in BAD_NUMBERS])
def test_a_bad_number_names_the_flag_the_value_and_what_is_valid(capsys, head, flag, value, valid):
    err = _refused(capsys, [*head, f"{flag}={value}"])
    assert f"argument {flag}: " in err
    assert repr(value) in err
    assert valid in err


def test_the_reported_case_reads_as_the_issue_asks(capsys):
    err = _refused(capsys, ["train", "--epochs", "-1"])
    assert "argument --epochs: must be a positive integer (at least 1), got '-1'" in err
    assert "epochs and batch size" not in err


def test_every_numeric_option_of_every_subcommand_has_a_checked_type():
    """No bare int / float: each numeric option says its valid range (one validation path)."""
    checked = (cli.Number, cli._hidden, cli._int_list)
    seen = 0
    for name, parser in _subparsers(build_parser()).items():
        for action in parser._actions:
            assert action.type not in (int, float), f"{name} {action.option_strings}: bare {action.type.__name__}"
            if isinstance(action.type, cli.Number) or action.type in checked:
                seen += 1
    assert seen >= 60  # train, compare and finetune share about 20 each; bench has its own


def test_a_missing_directory_is_not_called_an_unknown_dataset(capsys, tmp_path):
    for spec in (str(tmp_path / "no" / "such"), "./no-such-dir", "~/no-such-dir-fastdfa"):
        assert main(["train", "--data", spec, "--epochs", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--data {spec}: no such directory" in err
        assert "unknown dataset" not in err
        for name in ("digits", "fashion-mnist", "austen", "directory of MNIST-layout IDX files"):
            assert name in err
    (tmp_path / "file").write_text("")
    assert main(["train", "--data", str(tmp_path / "file"), "--epochs", "1", "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_an_unknown_name_lists_the_names_and_the_closest(capsys):
    assert main(["train", "--data", "digts", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--data 'digts': unknown dataset (did you mean digits?)" in err
    assert "fashion-mnist" in err and "austen" in err
    assert main(["train", "--data", "zzz", "--epochs", "1", "--no-progress"]) == 2
    assert "did you mean" not in capsys.readouterr().err
    assert main(["finetune", "--pretrain-data", "./gone:0-4", "--data", "digits:5-9", "--epochs", "1",
                 "--no-progress"]) == 2
    assert "--pretrain-data ./gone: no such directory" in capsys.readouterr().err


def test_dataset_spec_passes_names_classes_and_home_directories(tmp_path, monkeypatch):
    assert dataset_spec("digits") == "digits"
    assert dataset_spec("digits:0-4") == "digits:0-4"
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "idx").mkdir()
    assert dataset_spec("~/idx") == str(tmp_path / "idx")
    assert dataset_spec("~/idx:1,2") == f"{tmp_path / 'idx'}:1,2"


@pytest.mark.parametrize("command", ["train", "compare", "finetune", "bench", "data"])
def test_every_option_in_every_help_shows_its_default(command):
    parser = _subparsers(build_parser())[command]
    formatter = parser.formatter_class(parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._expand_help(action)
        assert "default" in text, f"{command} {action.option_strings[0]}: {text!r}"


def test_train_help_prints_the_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help is wrapped
    for text in ("passes over the training set (default: 10)", "samples per training step (default: 128)",
                 "(default: 256,256,256)", "the learning rule (default: dfa)", "(default: digits)"):
        assert text in out


def test_the_hint_follows_the_result():
    hint = low_accuracy_hint("dfa", 0.26, 10, 3, 3e-4, lr_given=False)  # the reported run
    assert hint.startswith("hint: dfa ended at test accuracy 0.26, near chance (0.10 for 10 classes)")
    assert "after 3 epochs at the default --lr 0.0003 for dfa" in hint
    assert "--epochs 10 or more" in hint and "a larger --lr" in hint
    # near chance: under a quarter of the way from 1/classes to 1 (10 classes: 0.325, 20 classes: 0.2875)
    assert low_accuracy_hint("dfa", 0.33, 10, 3, 3e-4, lr_given=False) is None
    assert low_accuracy_hint("fa", 0.30, 10, 3, 3e-4, lr_given=False) is not None
    assert low_accuracy_hint("fa", 0.30, 20, 3, 3e-4, lr_given=False) is None
    assert low_accuracy_hint("grape", 0.28, 20, 3, 3e-4, lr_given=False) is not None
    assert low_accuracy_hint("bp", 0.11, 10, 3, 1e-3, lr_given=False) is None  # not the slow start of DFA
    given = low_accuracy_hint("dfa", 0.1, 10, 12, 1e-4, lr_given=True)
    assert "at --lr 0.0001;" in given and "more --epochs than 12" in given


def test_a_near_chance_dfa_run_prints_the_hint(capsys):
    small = ["--epochs", "1", "--hidden", "16", "--train-samples", "300", "--no-progress"]
    assert main(["train", *small]) == 0
    out = capsys.readouterr().out
    assert "hint: dfa ended at test accuracy" in out and "--epochs 10 or more" in out
    assert main(["compare", "--timing-rounds", "1", *small]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and hints[0].startswith("hint: dfa ")


def test_library_validation_names_the_flag_and_the_value():
    for field, flag in (("epochs", "--epochs"), ("batch_size", "--batch-size"), ("check_every", "--check-every")):
        with pytest.raises(ValueError, match=f"{field} \\({flag}\\) must be .*got 0"):
            TrainConfig(**{field: 0}).validate()
    with pytest.raises(ValueError, match=r"\(--lr\) must be a positive number, got -1"):
        TrainConfig(lr=-1.0).validate()
