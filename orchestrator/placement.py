"""Where trials run: resources, per-node fit, placement groups and the pool of runner actors.

Each runner actor lives in a placement group of its own shape (one bundle: the trial actor's
resources) and is reused by later trials of that shape. A kind whose trials start workers of
their own (training: Ray Train's workers) declares them as worker bundles; those are reserved
together, atomically, as one more placement group before the trial starts, and handed over
when it does (Ray Train places its workers in a group of its own, so the driver releases the
reservation the moment the trial starts and keeps counting it as used until the trial ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util import placement_group, remove_placement_group
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.expand import Trial
from orchestrator.spec import SpecError

RAY_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
EPS = 1e-9
GIB = 1024**3

Shape = tuple[tuple[str, float], ...]


class PlacementError(SpecError):
    """A trial no node of the cluster can hold; ``str(err)`` is one line for the user (exit 2, like bad input)."""


def ray_resources(resources: dict[str, float]) -> dict[str, float]:
    """Grid resource names -> Ray's names (num_cpus -> CPU, ...), zeros dropped."""
    return {RAY_RESOURCE_NAMES.get(k, k): float(v) for k, v in resources.items() if v}


def add(total: dict[str, float], more: dict[str, float], sign: float = 1.0) -> dict[str, float]:
    """``total`` plus (or minus) ``more``, key by key (a new dict)."""
    out = dict(total)
    for key, value in more.items():
        out[key] = out.get(key, 0.0) + sign * value
    return out


def fits(need: dict[str, float], free: dict[str, float]) -> bool:
    """Whether ``need`` fits in ``free``."""
    return all(free.get(k, 0.0) + EPS >= v for k, v in need.items())


@dataclass(frozen=True)
class TrialNeeds:
    """A trial's resources in Ray's names: its actor's bundle and its workers' bundles."""

    actor: dict[str, float]
    workers: list[dict[str, float]]

    @property
    def total(self) -> dict[str, float]:
        """Everything the running trial occupies."""
        out = dict(self.actor)
        for bundle in self.workers:
            out = add(out, bundle)
        return out

    @property
    def shape(self) -> Shape:
        """The actor's shape (actors are reused per shape)."""
        return tuple(sorted(self.actor.items()))

    def describe(self) -> str:
        """'CPU=1 + 2 workers x {CPU=1 GPU=1}'."""
        parts = [_resources_text(self.actor)] if self.actor else []
        if self.workers:
            parts.append(f"{len(self.workers)} worker(s) x {{{_resources_text(self.workers[0])}}}")
        return " + ".join(parts) or "nothing"


def trial_needs(kind: Any, trial: Trial) -> TrialNeeds:
    """A trial's actor and worker bundles, in Ray's resource names, as its kind declares them."""
    params = kind.params_model.model_validate(trial.params)
    return TrialNeeds(actor=ray_resources(kind.actor_resources(params, trial.resources)),
                      workers=[ray_resources(b) for b in kind.worker_bundles(params, trial.resources)])


def node_totals() -> list[tuple[str, dict[str, float]]]:
    """(node address, total resources) of every alive node."""
    out = []
    for node in ray.nodes():
        if node.get("Alive"):
            resources = {k: float(v) for k, v in node.get("Resources", {}).items() if not k.startswith("node:")}
            out.append((node.get("NodeManagerAddress", "?"), resources))
    return out


def can_place(needs: TrialNeeds, nodes: list[dict[str, float]]) -> bool:
    """Whether the actor fits one node and the workers pack into the nodes (first fit, largest first)."""
    if needs.actor and not any(fits(needs.actor, node) for node in nodes):
        return False
    room = [dict(node) for node in nodes]
    for bundle in sorted(needs.workers, key=lambda b: sorted(b.items()), reverse=True):
        for i, node in enumerate(room):
            if fits(bundle, node):
                room[i] = add(node, bundle, -1.0)
                break
        else:
            return False
    return True


def _resources_text(resources: dict[str, float]) -> str:
    return " ".join(f"{k}={v / GIB:.1f}GiB" if k.endswith("memory") else f"{k}={v:g}" for k, v in sorted(resources.items()))


def describe_nodes(nodes: list[tuple[str, dict[str, float]]]) -> str:
    """'node 10.0.0.1: CPU=2 memory=3.1GiB; node ...' (the resources a trial can use)."""
    if not nodes:
        return "no alive nodes"
    shown = []
    for address, resources in nodes:
        wanted = {k: v for k, v in resources.items() if k != "object_store_memory"}
        shown.append(f"node {address}: {_resources_text(wanted)}")
    return "; ".join(shown)


def check_placeable(needs_by_trial: dict[str, TrialNeeds], nodes: list[tuple[str, dict[str, float]]]) -> None:
    """Raise PlacementError naming the first trial that no node (set) can hold, with each node's resources."""
    totals = [resources for _address, resources in nodes]
    for trial_id, needs in needs_by_trial.items():
        if not can_place(needs, totals):
            others = sum(1 for n in needs_by_trial.values() if not can_place(n, totals)) - 1
            more = f" (and {others} more trial(s))" if others > 0 else ""
            raise PlacementError(
                f"trial {trial_id}{more} needs {needs.describe()}, which no node can hold; {describe_nodes(nodes)}"
            )


def actor_options(resources: dict[str, float], group: PlacementGroup | None) -> dict[str, Any]:
    """``.options()`` arguments for a runner actor holding ``resources`` (Ray names) in ``group``."""
    options: dict[str, Any] = {
        "num_cpus": resources.get("CPU", 0.0),
        "num_gpus": resources.get("GPU", 0.0),
        "max_restarts": 0,
        "max_concurrency": 2,  # run() plus where()/shutdown() while a trial is running
    }
    if resources.get("memory"):
        options["memory"] = resources["memory"]
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    if custom:
        options["resources"] = custom
    if group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    return options


def reserve(bundles: list[dict[str, float]]) -> PlacementGroup | None:
    """A placement group holding ``bundles`` together (PACK: as few nodes as possible), or None if empty."""
    bundles = [b for b in bundles if b]
    return placement_group(bundles, strategy="PACK") if bundles else None


def release(group: PlacementGroup | None) -> None:
    """Give a placement group's resources back (best effort)."""
    if group is None:
        return
    try:
        remove_placement_group(group)
    except Exception:  # already gone with its node or the cluster
        pass


@dataclass
class Slot:
    """One runner actor (in its placement group) and the trial it runs."""

    actor: Any
    shape: Shape
    group: PlacementGroup | None
    ready_ref: Any  # resolves once the actor process is up (then None)
    created: float
    node: str | None = None  # Ray node id, known once the actor is up
    session_key: str | None = None  # engine group of the session the actor has open
    trial: Trial | None = None
    needs: TrialNeeds | None = None
    workers: PlacementGroup | None = None  # the trial's worker reservation, until it starts
    workers_ready: Any = None  # resolves once ``workers`` is reserved
    # Intervals (waiting, timeouts) use time.monotonic(): a suspended laptop or an NTP step must
    # not time every running trial out.
    waiting_since: float = 0.0  # when the trial was given this slot (monotonic)
    ref: Any = None  # the run() result, once started
    started: float = 0.0  # when the trial's resources were reserved and it started (wall clock, recorded)
    started_clock: float = 0.0  # the same moment, monotonic (its timeout counts from here)

    @property
    def reserved(self) -> dict[str, float]:
        """What this slot holds: a running trial's whole footprint, an idle actor's shape."""
        if self.trial is not None and self.needs is not None:
            return self.needs.total
        return dict(self.shape)


class ActorPool:
    """Runner actors by shape; idle ones are reused, preferring an open session of the trial's engine group."""

    def __init__(self, runner_cls: Any, kind: str):
        self.runner_cls = runner_cls
        self.kind = kind
        self.slots: list[Slot] = []

    def running(self) -> list[Slot]:
        """Slots with a trial (starting or started)."""
        return [s for s in self.slots if s.trial is not None]

    def idle(self) -> list[Slot]:
        """Slots without a trial."""
        return [s for s in self.slots if s.trial is None]

    def used(self) -> dict[str, float]:
        """Resources every slot holds together."""
        out: dict[str, float] = {}
        for slot in self.slots:
            out = add(out, slot.reserved)
        return out

    def idle_slot(self, shape: Shape, group_key: str) -> Slot | None:
        """An idle actor of this shape, preferring one whose open session is ``group_key``."""
        idle = [s for s in self.idle() if s.shape == shape]
        return next((s for s in idle if s.session_key == group_key), idle[0] if idle else None)

    def new_slot(self, shape: Shape, now: float) -> Slot:
        """Start an actor of ``shape`` in a placement group of its own."""
        resources = dict(shape)
        group = reserve([resources])
        actor = self.runner_cls.options(**actor_options(resources, group)).remote(self.kind)
        slot = Slot(actor=actor, shape=shape, group=group, ready_ref=actor.where.remote(), created=now)
        self.slots.append(slot)
        return slot

    def discard(self, slot: Slot, kill: bool = True) -> None:
        """Forget a slot; kill its actor and give its reservations back."""
        if slot in self.slots:
            self.slots.remove(slot)
        release(slot.workers)
        slot.workers = slot.workers_ready = None
        if kill:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already dead
                pass
        release(slot.group)
