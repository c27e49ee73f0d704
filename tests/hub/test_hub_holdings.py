"""The per-operator counts the hub keeps as workers and leases come and go (`HubState.registered`, `held`:
every lease asks for the operator's fair share, which counted every worker and lease before) equal a count
from scratch after any sequence of registrations, leases, results, backups, stale versions, expiries,
departures and quarantines; and nothing handed out is lost or in two places."""

from __future__ import annotations

from helpers.hub_state import make_state, register, submit
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.hub.fair import holdings_agree
from rl.wire.protocol import LeaseRequest

OPERATORS = ["tok-a", "tok-b", "tok-c"]
OPS = ["register", "lease", "submit", "stale", "publish", "time", "leave", "quarantine", "release"]


def _where_tasks_are(state) -> None:
    places = state.audit()
    seen = [t for place in ("queued", "leased", "scoring", "buffered") for t in places[place]]
    assert len(seen) == len(set(seen)), places  # in one place at most
    assert set(seen) == set(range(places["position"])), places  # nothing lost (none consumed here)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_kept_counts_equal_a_recount_after_any_sequence(data):
    state = make_state(**{"hub.backup_min_s": 1.0, "hub.backup_factor": 1.0, "hub.heartbeat_interval_s": 5.0,
                          "hub.lease_ttl_s": 12.0, "async.max_staleness": 1})  # fmt: skip
    workers: dict[str, str] = {}  # worker id -> its operator
    now = 0.0
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(OPS))
        live = [w for w in workers if w in state.workers]  # in registration order (ids are random)
        if op == "register":
            operator = data.draw(st.sampled_from(OPERATORS))
            if operator not in state.blocked:
                workers[register(state, operator, now)] = operator
        elif op == "lease" and live:
            wid = data.draw(st.sampled_from(live))
            req = LeaseRequest(
                worker_id=wid, policy_version=state.policy_version, max_tasks=data.draw(st.integers(1, 3))
            )
            if workers[wid] not in state.blocked:
                state.lease(req, workers[wid], now)
        elif op in ("submit", "stale") and state.leases:
            lease = state.leases[data.draw(st.sampled_from(list(state.leases)))]
            tids = sorted(lease.task_ids)
            if tids:
                some = data.draw(st.lists(st.sampled_from(tids), min_size=1, max_size=len(tids), unique=True))
                version = state.policy_version if op == "submit" else state.policy_version - 2
                try:
                    submit(state, lease.worker_id, lease.lease_id, some, version=max(version, 0),
                           caller=workers[lease.worker_id])  # fmt: skip
                except Exception as e:  # a stale version or an older lease: refused, by the rules under test
                    assert getattr(e, "reason", "") in ("stale_version", "version_before_lease"), e
        elif op == "publish":
            state.publish(state.policy_version + 1)
        elif op == "time":
            now += data.draw(st.sampled_from([0.5, 2.0, 6.0, 20.0]))
            for wid in live:  # most workers stay alive; the expiry takes the rest and stale leases
                if data.draw(st.booleans()):
                    state.workers[wid].last_seen = now
            state.expire(now)
        elif op == "leave" and live:
            wid = data.draw(st.sampled_from(live))
            state.leave(wid, workers[wid])
        elif op == "quarantine":
            operator = data.draw(st.sampled_from(OPERATORS))
            state.block_operator(operator)
            for wid in state.workers_of(operator):
                state.drop_worker_work(wid)
        elif op == "release":
            state.unblock_operator(data.draw(st.sampled_from(OPERATORS)))
        assert holdings_agree(state), (op, dict(state.held), dict(state.registered))
        assert all(v >= 0 for v in state.held.values())
        _where_tasks_are(state)
