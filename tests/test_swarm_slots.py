"""Swarm-wide caps (swarm/slots.py) on a real swarm manager: many starts at once never
hold more slots than the cap, a refusal names the limit and holds nothing, a dead
server's slot is taken back."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from limited_provisioner import KernelLimitError
from limited_provisioner.docker.client import label
from limited_provisioner.swarm import slots

from .conftest import TEST_OWNER
from .harness import swarm_manager


@pytest.fixture
def call():
    client = swarm_manager()
    made: list[str] = []

    def _call(method, *args, **kwargs):
        result = getattr(client.api, method)(*args, **kwargs)
        if method == "create_config":
            made.append(args[0])
        return result

    yield _call
    for config in client.api.configs(filters={"label": label("slot")}):
        if config["Spec"]["Name"] in made:
            client.api.remove_config(config["ID"])


def held_by(call, kernel_ids):
    configs = call("configs", filters={"label": label("slot")})
    return [c for c in configs
            if (c["Spec"].get("Labels") or {}).get(label("kernel-id")) in kernel_ids]


def test_concurrent_claims_never_exceed_the_cap(call):
    kernels = [str(uuid.uuid4()) for _ in range(12)]

    def start(kid):
        try:
            return slots.claim(call, kernel_id=kid, owner=TEST_OWNER, max_kernels=5,
                               max_kernels_per_user=None, live_kernels=lambda: set(kernels))
        except KernelLimitError as e:
            return e

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(start, kernels))
    admitted = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if isinstance(o, KernelLimitError)]
    assert len(admitted) == 5 and len(refused) == 7, outcomes
    assert sorted(name for names in admitted for name in names) == [
        slots.slot_name(slots.ALL, i) for i in range(5)]
    assert all(e.limit == "max_kernels" for e in refused)
    assert "max_kernels=5 reached: 5 limited kernels are running in the swarm" in str(
        refused[0])
    assert len(held_by(call, kernels)) == 5

    # One gives its slot back: the next start gets it.
    first = kernels[outcomes.index(admitted[0])]
    assert slots.release(call, first) == 1
    late = str(uuid.uuid4())
    assert slots.claim(call, kernel_id=late, owner=TEST_OWNER, max_kernels=5,
                       max_kernels_per_user=None, live_kernels=set) == admitted[0]
    for kid in [*kernels, late]:
        slots.release(call, kid)
    assert held_by(call, [*kernels, late]) == []


def test_a_user_cap_refusal_holds_nothing(call):
    owner = f"{TEST_OWNER}-{uuid.uuid4().hex[:6]}"
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert slots.claim(call, kernel_id=a, owner=owner, max_kernels=50,
                       max_kernels_per_user=1, live_kernels=set) == [
        slots.slot_name(slots.user_scope(owner), 0), slots.slot_name(slots.ALL, 0)]
    with pytest.raises(KernelLimitError, match=rf"max_kernels_per_user=1 reached: "
                       rf"'{owner}' already runs 1 kernels") as info:
        slots.claim(call, kernel_id=b, owner=owner, max_kernels=50, max_kernels_per_user=1,
                    live_kernels=lambda: {a})
    assert info.value.limit == "max_kernels_per_user"
    assert held_by(call, [b]) == []
    slots.release(call, a)


def test_a_dead_servers_slot_is_taken_back_only_when_stale(call):
    dead, new = str(uuid.uuid4()), str(uuid.uuid4())
    slots.claim(call, kernel_id=dead, owner=TEST_OWNER, max_kernels=1,
                max_kernels_per_user=None, live_kernels=set)
    # Fresh: its start may still be creating the service.
    assert slots.reclaim_stale(call, set()) == []
    with pytest.raises(KernelLimitError):
        slots.claim(call, kernel_id=new, owner=TEST_OWNER, max_kernels=1,
                    max_kernels_per_user=None, live_kernels=set)
    # Its kernel has a service: never taken back, however old.
    later = time.time() + slots.STALE_AFTER + 5
    assert slots.reclaim_stale(call, {dead}, now=later) == []
    assert slots.reclaim_stale(call, set(), now=later) == [slots.slot_name(slots.ALL, 0)]
    assert slots.claim(call, kernel_id=new, owner=TEST_OWNER, max_kernels=1,
                       max_kernels_per_user=None, live_kernels=set) == [
        slots.slot_name(slots.ALL, 0)]
    slots.release(call, new)
