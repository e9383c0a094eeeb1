"""`trainer.cli.user_errors_exit`: bad input is one line and exit code 2 on every rank that meets it."""

import socket

import pytest

from config.schema import ConfigError
from trainer.cli import user_errors_exit
from trainer.data import DataError


def failing(rank, err, during_training=False):
    with pytest.raises(SystemExit) as stop:
        with user_errors_exit(rank, during_training):
            raise err
    return stop.value.code


def test_a_setup_error_on_a_rank_other_than_0_says_why_with_its_rank_and_host(capsys):
    # A data file missing on one node: only that node's ranks fail. Was: exit 2 in silence.
    assert failing(3, DataError("data.train_files=/data/train.parquet: not found")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"[rank 3] error: data.train_files=/data/train.parquet: not found (on {socket.gethostname()})"]


def test_rank_0_says_it_as_before(capsys):
    assert failing(0, ConfigError("trainer.epochs: unknown key")) == 2
    assert capsys.readouterr().err.splitlines() == ["error: trainer.epochs: unknown key"]


def test_an_error_outside_the_user_errors_is_not_swallowed(capsys):
    with pytest.raises(RuntimeError, match="a bug"):
        with user_errors_exit(1):
            raise RuntimeError("a bug")
    assert capsys.readouterr().err == ""
