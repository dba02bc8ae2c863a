"""SeqGate, the per-connection dedupe and gap-fill logic, against arbitrary broker behaviour."""

from hypothesis import given, settings
from hypothesis import strategies as st

from meeting.sequencing import SeqGate


@st.composite
def broker_runs(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int]]]:
    """A device that has everything up to `start`, then N more messages, which the
    broker delivers lossy, duplicated and reordered, interleaved with database fills."""
    start = draw(st.integers(0, 5))
    total = draw(st.integers(0, 40))
    delivered = draw(st.lists(st.integers(1, start + total), max_size=3 * total + 5)) if start + total else []
    events: list[tuple[str, int]] = [("broker", s) for s in delivered]
    for _ in range(draw(st.integers(0, 4))):
        events.insert(draw(st.integers(0, len(events))), ("fill", draw(st.integers(0, start + total))))
    return start, total, events


@given(broker_runs())
@settings(max_examples=400, deadline=None)
def test_every_seq_is_emitted_once_and_in_order(run: tuple[int, int, list[tuple[str, int]]]) -> None:
    start, total, events = run
    gate: SeqGate[int] = SeqGate(start)
    emitted: list[int] = []

    def fill(upto: int) -> None:
        # The database has every committed message; a fill reads those after gate.last
        # (here: the ones committed so far, up to `upto`).
        for seq in range(gate.last + 1, upto + 1):
            emitted.extend(gate.offer(seq, seq))

    for kind, seq in events:
        if kind == "broker":
            emitted.extend(gate.offer(seq, seq))
        else:
            fill(seq)
    fill(start + total)  # the final catch-up the connection triggers on any gap
    assert emitted == list(range(start + 1, start + total + 1))
    assert not gate.waiting


def test_duplicates_and_old_seqs_are_dropped_and_early_ones_held() -> None:
    gate: SeqGate[str] = SeqGate(3)
    assert gate.offer(2, "old") == []
    assert gate.offer(5, "e") == [] and gate.waiting
    assert gate.offer(5, "dup") == []
    assert gate.offer(4, "d") == ["d", "e"] and not gate.waiting
    assert gate.last == 5
