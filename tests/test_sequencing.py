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


def test_followers_wait_for_their_seq_and_keep_their_order() -> None:
    gate: SeqGate[str] = SeqGate(2)
    assert gate.follow(1, "read of 1") == ["read of 1"]           # its message was sent already
    assert gate.offer(4, "m4") == [] and gate.waiting
    assert gate.follow(4, "read of 4") == [] and gate.followers == 1  # must not overtake m4
    assert gate.follow(2, "read of 2") == []                       # nor the read before it
    assert gate.follow(6, "read of 6") == [] and gate.known == 6   # a seq not even heard of: fetch up to it
    assert gate.offer(3, "m3") == ["m3", "m4", "read of 4", "read of 2"]
    assert gate.waiting and gate.followers == 1
    assert gate.offer(5, "m5") == ["m5"] and gate.offer(6, "m6") == ["m6", "read of 6"]
    assert not gate.waiting and gate.followers == 0


def test_messages_beyond_the_cap_are_dropped_but_still_waited_for() -> None:
    gate: SeqGate[int] = SeqGate(0, cap=2)
    assert gate.offer(3, 3) == [] and gate.offer(4, 4) == [] and gate.offer(5, 5) == []  # 5: over the cap
    assert gate.known == 5 and gate.waiting
    assert gate.offer(1, 1) == [1] and gate.offer(2, 2) == [2, 3, 4]
    assert gate.waiting  # 5 was heard of, not kept: the database has it
    assert gate.offer(5, 5) == [5] and not gate.waiting
    gate.heard(7)
    assert gate.waiting and gate.offer(6, 6) == [6] and gate.offer(7, 7) == [7] and not gate.waiting


@given(broker_runs(), st.lists(st.integers(0, 45), max_size=10), st.data())
@settings(max_examples=300, deadline=None)
def test_a_follower_never_overtakes_its_seq_and_followers_keep_their_order(
        run: tuple[int, int, list[tuple[str, int]]], reads: list[int], data: st.DataObject) -> None:
    start, total, events = run
    end = start + total
    gate: SeqGate[tuple[str, int]] = SeqGate(start, cap=data.draw(st.sampled_from([None, 1, 3])))
    emitted: list[tuple[str, int]] = []
    for n, after in enumerate(min(r, end) for r in reads):
        events.insert(data.draw(st.integers(0, len(events))), ("read", after * 100 + n))
    for kind, value in events:
        if kind == "broker":
            emitted.extend(gate.offer(value, ("m", value)))
        elif kind == "read":
            emitted.extend(gate.follow(value // 100, ("r", value)))
        else:
            for seq in range(gate.last + 1, value + 1):
                emitted.extend(gate.offer(seq, ("m", seq)))
    for seq in range(gate.last + 1, end + 1):  # the catch-up the connection runs while waiting
        emitted.extend(gate.offer(seq, ("m", seq)))
    assert [v for k, v in emitted if k == "m"] == list(range(start + 1, end + 1))
    order = [v for k, v in emitted if k == "r"]
    assert order == [v for k, v in events if k == "read"]  # every follower, in arrival order
    for i, (kind, value) in enumerate(emitted):
        if kind == "r":
            assert value // 100 <= start or ("m", value // 100) in emitted[:i]
    assert not gate.waiting
