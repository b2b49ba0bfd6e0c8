"""Admission's engine-group rules (orchestrator/admission.py, EngineGroups), without Ray."""

from __future__ import annotations

from orchestrator.admission import EngineGroups
from orchestrator.expand import Trial
from orchestrator.placement import ActorPool, Slot


def _trials(group: str, count: int) -> list[Trial]:
    return [Trial(trial_id=f"{group}{i}", index=i, repeat=0, params={}, axes={}, resources={}, group_key=group)
            for i in range(count)]


def _slot(session: str | None = None, running: Trial | None = None) -> Slot:
    return Slot(actor=None, shape=(("CPU", 1.0),), group=None, ready_ref=None, created=0.0, session_key=session,
                trial=running)


def _pool(*slots: Slot) -> ActorPool:
    pool = ActorPool(runner_cls=None, kind="toy")
    pool.slots.extend(slots)
    return pool


def test_free_actors_start_different_groups_before_loading_one_twice() -> None:
    pending = _trials("a", 3) + _trials("b", 3)
    groups = EngineGroups(pending, _pool())
    first = _slot()
    assert groups.allows(pending[0], "whole")
    groups.taken(pending[0], first)
    assert not groups.allows(pending[1], "whole")  # group a is running: b goes first
    assert groups.allows(pending[3], "whole")
    # a's 2 remaining trials would give 2 actors 1 each: not worth a second load
    assert not groups.allows(pending[1], "split")


def test_an_idle_actor_with_the_groups_session_takes_its_next_trial_first() -> None:
    pending = _trials("b", 1) + _trials("a", 2)
    warm = _slot(session="a")
    groups = EngineGroups(pending, _pool(warm, _slot(running=_trials("a", 1)[0])))
    assert [t.trial_id for t in groups.order(pending)] == ["a0", "a1", "b0"]
    assert groups.allows(pending[1], "whole")  # a is running elsewhere, but this actor has it open
    groups.taken(pending[1], warm)
    assert not groups.allows(pending[2], "whole")  # the one open session is used now


def test_a_long_group_spreads_over_actors_two_pending_trials_each() -> None:
    pending = _trials("a", 12)
    groups = EngineGroups(pending, _pool())
    groups.taken(pending[0], _slot())
    taken = 1
    while groups.allows(pending[taken], "split"):
        groups.taken(pending[taken], _slot())
        taken += 1
    # pending >= 2 x (actors + 1): a 2nd (11 >= 4), 3rd (10 >= 6), 4th (9 >= 8), not a 5th (8 < 10)
    assert taken == 4
