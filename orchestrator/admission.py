"""Admission: which pending trials start now, by the driver's own books of the cluster's resources.

A trial is admitted when some node can hold its footprint and the free resources (cluster totals
minus what the actor pool holds) cover it. An idle runner actor of the trial's shape is reused;
otherwise idle actors of other shapes give their reservations back when that makes room. A trial
that no node can hold any more (a node left) fails once it has waited ``placement_wait_s``.
For kinds with engine groups (``load_keys``), ``EngineGroups`` orders and holds back trials so
that each group's engine is loaded as few times as the free actors allow.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

from orchestrator.expand import Trial
from orchestrator.placement import (
    ActorPool,
    Slot,
    TrialNeeds,
    add,
    can_place,
    check_placeable,
    describe_nodes,
    fits,
    node_totals,
    trial_needs,
)
from workloads.kind import TrialKind

# How long a trial may wait for resources that no node has any more (a node left) before it fails.
PLACEMENT_WAIT_S = 120.0


class ClusterView:
    """The cluster's nodes and their summed totals, re-read at most every ``refresh_s`` (nodes come and go)."""

    def __init__(self, refresh_s: float = 1.0) -> None:
        self.refresh_s = refresh_s
        self.nodes: list[tuple[str, dict[str, float]]] = []
        self.capacity: dict[str, float] = {}
        self._read_at = 0.0

    def refresh(self, force: bool = False) -> None:
        """Re-read the nodes when ``refresh_s`` has passed (or ``force``: e.g. a worker was lost)."""
        now = time.monotonic()
        if force or now - self._read_at >= self.refresh_s:
            self.nodes = node_totals()
            self.capacity = {}
            for _address, resources in self.nodes:
                self.capacity = add(self.capacity, resources)
            self._read_at = now

    def invalidate(self) -> None:
        """Make the next refresh re-read the cluster."""
        self._read_at = 0.0

    def node_resources(self) -> list[dict[str, float]]:
        """Each node's totals (refreshed)."""
        self.refresh()
        return [resources for _address, resources in self.nodes]


class Admission:
    """Decides, each round of the driver's loop, which pending trials get an actor and which fail."""

    def __init__(self, kind: TrialKind, pool: ActorPool, refresh_s: float = 1.0,
                 placement_wait_s: float = PLACEMENT_WAIT_S) -> None:
        self.kind = kind
        self.pool = pool
        self.cluster = ClusterView(refresh_s)
        self.placement_wait_s = placement_wait_s
        self._needs: dict[str, TrialNeeds] = {}
        self._unfit_since: dict[str, float] = {}

    def needs(self, trial: Trial) -> TrialNeeds:
        """The trial's actor and worker bundles, in Ray's resource names."""
        if trial.trial_id not in self._needs:
            self._needs[trial.trial_id] = trial_needs(self.kind, trial)
        return self._needs[trial.trial_id]

    def check_placeable(self, trials: Iterable[Trial]) -> None:
        """Raise PlacementError when some trial fits no node of the cluster (read now)."""
        self.cluster.refresh(force=True)
        check_placeable({t.trial_id: self.needs(t) for t in trials}, self.cluster.nodes)

    def unplaceable_error(self, trial: Trial, since: float, now: float) -> str | None:
        """The error for a trial no node can hold any more, once it has waited ``placement_wait_s``."""
        needs = self.needs(trial)
        if can_place(needs, self.cluster.node_resources()) or now - since < self.placement_wait_s:
            return None
        return (f"no node can hold {needs.describe()} any more (waited {self.placement_wait_s:g}s); "
                f"{describe_nodes(self.cluster.nodes)}")

    def admit(self, pending: Iterable[Trial], assign: Callable[[Trial, Slot, TrialNeeds], None],
              fail: Callable[[Trial, str], None]) -> None:
        """Call ``assign`` for each trial that starts now (in order) and ``fail`` for each that never can."""
        self.cluster.refresh()
        free = add(self.cluster.capacity, self.pool.used(), -1.0)
        now = time.monotonic()
        trials = list(pending)
        groups = EngineGroups(trials, self.pool) if self.kind.load_keys else None
        handled: set[str] = set()
        for rule in ("whole", "split") if groups is not None else ("any",):
            for trial in groups.order(trials) if groups is not None else trials:
                if trial.trial_id in handled or (groups is not None and not groups.allows(trial, rule)):
                    continue
                needs = self.needs(trial)
                if not can_place(needs, self.cluster.node_resources()):
                    error = self.unplaceable_error(trial, self._unfit_since.setdefault(trial.trial_id, now), now)
                    if error:
                        handled.add(trial.trial_id)
                        fail(trial, error)
                    continue
                self._unfit_since.pop(trial.trial_id, None)
                slot = self.pool.idle_slot(needs.shape, trial.group_key)
                # Reusing an idle actor reuses what it reserves; a new actor needs the whole footprint.
                extra = add(needs.total, dict(slot.shape) if slot is not None else {}, -1.0)
                if slot is None and not fits(extra, free):
                    idle = self.pool.idle()
                    freed = free
                    for other in idle:
                        freed = add(freed, dict(other.shape))
                    if not idle or not fits(extra, freed):
                        continue
                    for other in idle:  # idle actors of other shapes give their reservations back
                        self.pool.discard(other)
                    free = freed
                if not fits(extra, free):
                    continue
                slot = slot or self.pool.new_slot(needs.shape, now)
                if groups is not None:
                    groups.taken(trial, slot)
                handled.add(trial.trial_id)
                # assign() gives the slot its trial before the next idle_slot() call can see it.
                assign(trial, slot, needs)
                free = add(free, extra, -1.0)


class EngineGroups:
    """Which pending trials of a kind with engine groups may take an actor now, so that a group's
    engine is loaded as few times as the cluster allows (DESIGN.md "Engine groups").

    ``whole`` (first): a trial whose group an idle actor has open (those first), or of a group no
    actor runs; so k actors start k different groups before any group is loaded twice.
    ``split`` (with what is left free): a group already running takes another actor only while it
    has at least two pending trials for each actor it would then hold, so a second load pays off
    and a group's last trials wait for its own actor instead of loading its engine again."""

    def __init__(self, trials: list[Trial], pool: ActorPool) -> None:
        self.holders = Counter(s.trial.group_key for s in pool.running() if s.trial is not None)
        self.warm = Counter(s.session_key for s in pool.idle() if s.session_key is not None)
        self.waiting = Counter(t.group_key for t in trials)

    def order(self, trials: list[Trial]) -> list[Trial]:
        """Trials whose group an idle actor has open first, otherwise in the given order."""
        return sorted(trials, key=lambda t: self.warm[t.group_key] == 0)

    def allows(self, trial: Trial, rule: str) -> bool:
        """Whether ``trial`` may take an actor under ``rule`` (whole | split)."""
        group = trial.group_key
        if rule == "whole":
            return self.warm[group] > 0 or self.holders[group] == 0
        return self.waiting[group] >= 2 * (self.holders[group] + 1)

    def taken(self, trial: Trial, slot: Slot) -> None:
        """Book ``trial`` onto ``slot`` (before the slot is given the trial)."""
        group, opened = trial.group_key, slot.session_key
        if slot.trial is None and opened is not None and self.warm[opened] > 0:
            self.warm[opened] -= 1  # that session is reused, or closed for another group
        self.holders[group] += 1
        self.waiting[group] -= 1
