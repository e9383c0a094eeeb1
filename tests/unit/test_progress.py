"""The progress display in a log file: whole lines, one per interval and one at the end."""

import io

from trainer.progress import PlainProgress


def test_plain_progress_writes_whole_lines_per_interval_and_at_the_end():
    now = [0.0]
    out = io.StringIO()
    bar = PlainProgress(total=10, initial=2, desc="train", stream=out, interval_s=30.0, clock=lambda: now[0])
    for _ in range(3):  # 3 steps in 15 s: nothing yet
        now[0] += 5.0
        bar.update(1)
    assert out.getvalue() == ""
    bar.set_postfix(loss="4.0700")
    now[0] += 15.0
    bar.update(1)  # 30 s since the start: steps 2 -> 6 at 4 steps / 30 s
    bar.close()  # nothing new since the last line: no second line
    assert out.getvalue() == "train: 6/10 steps (60%), 0.13 steps/s, eta 0m30s, loss=4.0700\n"
    now[0] += 10.0
    bar.update(4)
    bar.close()
    assert out.getvalue().splitlines()[-1] == "train: 10/10 steps (100%), 0.20 steps/s, loss=4.0700"
    assert "\r" not in out.getvalue()
