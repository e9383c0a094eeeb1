"""Process-group set-up details that CPU runs never exercise."""

from trainer.distributed import NCCL_WATCHDOG_ENV, set_nccl_watchdog_env


def test_nccl_watchdog_variables_are_set_unless_the_user_set_them():
    environ = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0", "PATH": "/usr/bin"}  # a user who turned the recorder off
    added = set_nccl_watchdog_env(environ)
    assert environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "0" and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in added
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert set(added) == set(NCCL_WATCHDOG_ENV) - {"TORCH_NCCL_TRACE_BUFFER_SIZE"}
    assert set_nccl_watchdog_env(environ) == {}  # a second call changes nothing
