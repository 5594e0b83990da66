"""`sinkfix bench`'s busy-machine note reads every load average it recorded (review 36)."""

import torch

from sinkfix.bench.results import busy_note

CPU = torch.device("cpu")


def test_note_prints_every_recorded_average():
    # the run the finding came from: 1-minute averages 1.06 and 3.91, but 5.12 / 5.57 over the
    # last 5 / 15 minutes at its end; the note said "up to 3.9"
    note = busy_note(CPU, [[1.06, 1.11, 1.17], [3.91, 5.12, 5.57]], 2)
    assert note is not None
    assert "start 1.1 / 1.1 / 1.2" in note and "end 3.9 / 5.1 / 5.6" in note and "2 usable CPUs" in note


def test_five_minute_average_at_the_end_counts():
    # both 1-minute samples under the CPUs, the load over the run above them
    assert busy_note(CPU, [[0.9, 0.8, 0.7], [1.5, 2.5, 1.0]], 2) is not None


def test_quiet_runs_and_other_devices_get_no_note():
    # the start's 5- and 15-minute averages describe the time before the run: not counted
    assert busy_note(CPU, [[0.5, 3.0, 3.0], [1.5, 1.9, 3.0]], 2) is None
    assert busy_note(CPU, [None, None], 2) is None
    assert busy_note(torch.device("meta"), [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]], 2) is None
    assert busy_note(CPU, [None, [3.0, 1.0, 1.0]], 2) is not None
