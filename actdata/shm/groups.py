"""Consumer groups: several trainers that each receive every row of one buffer (buffer.max_groups > 0).

A group is one trainer: all its DataLoader workers and DDP ranks read under one name, and each row reaches
exactly one of them (per `max_reads`). Every group receives every row written while it is registered, in
random order; a slot is refilled only when no group owes it a read and no claim holds it. The state lives in
the buffer file's group region (offsets: actdata.shm.layout), so every HTTP process, same-host readers and a
restarted HTTP process agree; a server restart forgets the groups with the file:

    owed     uint64 [capacity]   bit g set: group g has not finished with the slot
    busy     uint64 [capacity]   bit g set: a reader of group g holds a claim on the slot
    g_meta   int64 [G, META]     per group: state, generation, ready count, rows read/skipped/owed, claims, times
    g_names  uint8 [G, 64]       the group's name
    g_ready  int32 [G, capacity] the READY slots group g has not read (first `n` entries), sampled in O(k)
    g_owner  int32 [G, capacity] pid of the process holding group g's claim on a slot (freed if it dies)
    g_reads  uint16 [G, capacity] times group g read the slot (only with max_reads > 1)

In a buffer with groups a slot is READY from its commit until it is FREE again (the buffer's own ready list
is not used). Rows committed while no group is registered wait for the first group; a group that registers
owes every row READY at that moment. A request without a group name reads as the group DEFAULT_GROUP.
A group idle for `group_idle_s` is dropped and what it owes is released; with the `skip` lag policy a writer
that finds no free slot releases the unread rows of the most lagging group (counted in its rows_skipped).
Every change happens under the buffer's lock; the row copies happen outside it, as without groups.
"""
from __future__ import annotations

import logging
import os
import re
import time
from typing import NamedTuple, Optional

import numpy as np

from .layout import (
    GROUP_META,
    GROUP_NAME_BYTES,
    GROUP_POLICIES,
    H_EPOCH,
    H_GROUP_POLICY,
    H_GROUPS_EXPECTED,
    H_GROUPS_RELEASED,
    H_N_FREE,
    H_N_READY,
    H_REFRESHED,
    HF_GROUP_IDLE,
    READY,
)
from .lists import NotReady, remove_at, take

log = logging.getLogger(__name__)
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
DEFAULT_GROUP = "default"  # the group of a reader that names none, on a buffer with groups
EMPTY, ACTIVE, DRAINING = 0, 1, 2  # DRAINING: dropped, claims still out; its index is reused once they are back
STATE_NAMES = {ACTIVE: "active", DRAINING: "dropped"}
# g_meta fields (int64; the last three are float64 in the same memory)
M_STATE, M_GEN, M_N, M_READ, M_SKIPPED, M_CLAIMS, M_OWED = range(7)
MF_REGISTERED, MF_SEEN, MF_RATE = 13, 14, 15
RATE_WINDOW_S = 5.0
SKIP_SLACK = 0.5  # lag (fraction of capacity) beyond the least-lagging group's that `skip` lets a group keep


class GroupRefused(RuntimeError):
    """A group request that cannot be honoured: `status` is the HTTP status that says why (404, 409, 422)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status


class GroupClaim(NamedTuple):
    """What a group read hands back to `release`: the refresh epoch and the group (index, generation)."""

    epoch: int
    index: int
    gen: int


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise GroupRefused(422, f"group: {name!r} is not a group name (1-64 characters of A-Z a-z 0-9 _ . -)")
    return name


class GroupTable:
    """The group region of one attached buffer (see the module docstring). Methods whose name starts with
    `on_` or `_` run under the buffer's lock, held by the caller; the others take it."""

    def __init__(self, buf):
        self.b, spec, lay = buf, buf.spec, buf.spec.layout
        mm, cap, g = buf._mm, spec.capacity, spec.max_groups
        self.count, self.capacity = g, cap
        self.owed = np.frombuffer(mm, np.uint64, cap, lay["owed"])
        self.busy = np.frombuffer(mm, np.uint64, cap, lay["busy"])
        self.meta = np.frombuffer(mm, np.int64, g * GROUP_META, lay["g_meta"]).reshape(g, GROUP_META)
        self.fmeta = np.frombuffer(mm, np.float64, g * GROUP_META, lay["g_meta"]).reshape(g, GROUP_META)
        self.names = np.frombuffer(mm, np.uint8, g * GROUP_NAME_BYTES, lay["g_names"]).reshape(g, GROUP_NAME_BYTES)
        self.ready = np.frombuffer(mm, np.int32, g * cap, lay["g_ready"]).reshape(g, cap)
        self.owner = np.frombuffer(mm, np.int32, g * cap, lay["g_owner"]).reshape(g, cap)
        self.reads = np.frombuffer(mm, np.uint16, g * cap, lay["g_reads"]).reshape(g, cap) \
            if "g_reads" in lay else None
        self._cache: dict[str, int] = {}
        self._rates: dict[tuple[int, int], list] = {}  # (index, generation) -> [(time, rows read)], for tick

    def configure(self, policy: str = "wait", idle_s: float = 60.0, expected: int = 0) -> None:
        """The creator writes the group settings into the header, where every attached process reads them."""
        h = self.b._h
        h[H_GROUP_POLICY], h[H_GROUPS_EXPECTED] = GROUP_POLICIES.index(policy), int(expected)
        h[H_GROUPS_RELEASED] = int(expected == 0)
        self.b._hf[HF_GROUP_IDLE] = float(idle_s)

    @property
    def policy(self) -> str:
        return GROUP_POLICIES[int(self.b._h[H_GROUP_POLICY])]

    @property
    def idle_s(self) -> float:
        return float(self.b._hf[HF_GROUP_IDLE])

    # -- finding and registering ------------------------------------------------------------------
    def _name(self, g: int) -> str:
        return self.names[g].tobytes().rstrip(b"\0").decode()

    def _find(self, name: str) -> Optional[int]:
        g = self._cache.get(name)
        if g is not None and self.meta[g, M_STATE] == ACTIVE and self._name(g) == name:
            return g
        for g in np.nonzero(self.meta[:, M_STATE] == ACTIVE)[0].tolist():
            if self._name(g) == name:
                self._cache[name] = g
                return g
        return None

    def _register(self, name: str, now: float) -> int:
        g = self._find(name)
        if g is not None:
            return g
        empty = np.nonzero(self.meta[:, M_STATE] == EMPTY)[0]
        if len(empty) == 0:
            raise GroupRefused(409, f"group {name!r}: all buffer.max_groups={self.count} groups are registered "
                                    "(DELETE /groups/NAME drops one; idle groups are dropped after "
                                    f"buffer.group_idle_s={self.idle_s:g} s)")
        g = int(empty[0])
        ids = np.nonzero(self.b._state == READY)[0]  # O(capacity), once per registration
        gen = int(self.meta[g, M_GEN]) + 1
        self.meta[g] = 0
        self.meta[g, M_GEN], self.meta[g, M_N], self.meta[g, M_OWED] = gen, len(ids), len(ids)
        self.fmeta[g, MF_REGISTERED] = self.fmeta[g, MF_SEEN] = now
        self.names[g] = 0
        self.names[g, :len(name.encode())] = np.frombuffer(name.encode(), np.uint8)
        self.ready[g, :len(ids)] = ids
        self.owed[ids] |= np.uint64(1 << g)
        if self.reads is not None:
            self.reads[g, ids] = 0
        self.meta[g, M_STATE] = ACTIVE
        h = self.b._h
        if not h[H_GROUPS_RELEASED] and self.active_count() >= h[H_GROUPS_EXPECTED]:
            h[H_GROUPS_RELEASED] = 1
        log.info("consumer group %s registered (%d rows ready to it)", name, len(ids))
        return g

    def _holder(self, g: int) -> str:
        """Why a full buffer has nothing for group g under `wait`: the group that has the most rows unread."""
        others = [o for o in np.nonzero(self.meta[:, M_STATE] == ACTIVE)[0].tolist() if o != g]
        if not others:
            return ""
        o = max(others, key=lambda i: int(self.meta[i, M_N]))
        idle = time.time() - float(self.fmeta[o, MF_SEEN])
        return (f"; the buffer is full of rows group {self._name(o)} has not read (last read {idle:.0f} s ago; "
                "buffer.group_lag=wait waits for it, buffer.group_lag=skip would not, "
                f"buffer.group_idle_s={self.idle_s:g} drops it)")

    def active_count(self) -> int:
        return int(np.count_nonzero(self.meta[:, M_STATE] == ACTIVE))

    def register(self, name: str) -> dict:
        """Register `name` (or find it registered): its entry as in `list()`."""
        check_name(name)
        with self.b._lock:
            g = self._register(name, time.time())
            self.fmeta[g, MF_SEEN] = time.time()
            return self._entry(g)

    # -- reading ----------------------------------------------------------------------------------
    def claim(self, name: Optional[str], k: int) -> tuple[np.ndarray, GroupClaim]:
        """Claim k random slots that group `name` has not read (registering it first if new)."""
        name = check_name(DEFAULT_GROUP if name is None else name)
        b, now = self.b, time.time()
        with b._lock:
            g = self._register(name, now)
            self.fmeta[g, MF_SEEN] = now
            h = b._h
            if not h[H_GROUPS_RELEASED]:
                raise NotReady(f"waiting for consumer groups: {self.active_count()} of "
                                  f"buffer.groups_expected={int(h[H_GROUPS_EXPECTED])} registered")
            n_ready, n = int(h[H_N_READY]), int(self.meta[g, M_N])
            if n_ready < b.spec.min_fill * self.capacity:
                raise NotReady(f"buffer filling: {n_ready}/{self.capacity} rows ready, serving starts at "
                                  f"min_fill={b.spec.min_fill:g}")
            if n < k:
                raise NotReady(f"group {name}: only {n} rows ready that it has not read, {k} asked"
                               + (self._holder(g) if n_ready >= self.capacity and self.policy == "wait" else ""))
            ids = take(self.ready[g], n, int(k), b._random())
            self.meta[g, M_N] = n - len(ids)
            bit = np.uint64(1 << g)
            self.busy[ids] |= bit
            self.owner[g, ids] = os.getpid()
            self.meta[g, M_CLAIMS] += len(ids)
            return ids, GroupClaim(int(h[H_EPOCH]), g, int(self.meta[g, M_GEN]))

    def on_release(self, ids: np.ndarray, claim: GroupClaim) -> None:
        """A read of group `claim.index` ended: the slots go back to its list while its read budget lasts,
        else it owes them no more (and they go FREE when no other group does)."""
        g, bit = claim.index, np.uint64(1 << claim.index)
        self.busy[ids] &= ~bit
        self.meta[g, M_CLAIMS] -= len(ids)
        current = self.meta[g, M_GEN] == claim.gen and self.meta[g, M_STATE] == ACTIVE
        done = ids
        if current:
            self.meta[g, M_READ] += len(ids)
            self.fmeta[g, MF_SEEN] = time.time()
            if self.reads is not None and claim.epoch == self.b._h[H_EPOCH]:
                self.reads[g, ids] += 1
                again = self.reads[g, ids] < self.b.spec.max_reads
                done, back = ids[~again], ids[again]
                n = int(self.meta[g, M_N])
                self.ready[g, n:n + len(back)] = back
                self.meta[g, M_N] = n + len(back)
        elif self.meta[g, M_STATE] == DRAINING and self.meta[g, M_CLAIMS] == 0:
            self.meta[g, M_STATE] = EMPTY
        self.owed[done] &= ~bit
        self._settle(ids)

    def on_commit(self, ids: np.ndarray) -> None:
        """Newly READY slots: every registered group owes them."""
        h, active = self.b._h, np.nonzero(self.meta[:, M_STATE] == ACTIVE)[0].tolist()
        h[H_N_READY] += len(ids)
        self.owed[ids] = np.uint64(sum(1 << g for g in active))
        for g in active:
            n = int(self.meta[g, M_N])
            self.ready[g, n:n + len(ids)] = ids
            self.meta[g, M_N] = n + len(ids)
            self.meta[g, M_OWED] += len(ids)
            if self.reads is not None:
                self.reads[g, ids] = 0

    def _settle(self, ids: np.ndarray) -> None:
        """Slots among `ids` that no group owes and no claim holds go FREE."""
        b = self.b
        free = ids[(b._state[ids] == READY) & (self.owed[ids] == 0) & (self.busy[ids] == 0)]
        if len(free):
            b._state[free] = 0
            b._reads[free] = 0
            b._put(b._free, H_N_FREE, free)
            b._h[H_N_READY] -= len(free)

    # -- dropping, skipping, expiring ----------------------------------------------------------------
    def _drop(self, g: int, why: str) -> None:
        bit, n = np.uint64(1 << g), int(self.meta[g, M_N])
        ids = self.ready[g, :n].astype(np.int64)
        self.meta[g, M_N] = 0
        self.owed[ids] &= ~bit
        claimed = np.nonzero(self.busy & bit)[0] if self.meta[g, M_CLAIMS] else np.empty(0, np.int64)
        self.owed[claimed] &= ~bit
        self.meta[g, M_GEN] += 1
        self.meta[g, M_STATE] = DRAINING if self.meta[g, M_CLAIMS] > 0 else EMPTY
        self._settle(ids)
        log.warning("consumer group %s dropped (%s); %d rows it had not read released", self._name(g), why, n)

    def drop(self, name: str) -> dict:
        """Drop group `name` now (DELETE /groups/NAME); GroupRefused(404) when it is not registered."""
        check_name(name)
        with self.b._lock:
            g = self._find(name)
            if g is None:
                raise GroupRefused(404, f"group {name!r} is not registered")
            entry = self._entry(g)
            self._drop(g, "asked to")
            return entry

    def on_full(self, need: int) -> None:
        """A writer found fewer than `need` free slots: drop idle groups; with `skip`, release rows of the
        groups that lag: those that owe more than SKIP_SLACK x capacity rows beyond the least-lagging group,
        each down to that margin: rows that only it still owes first, then rows the least-lagging group has
        read. The least-lagging group loses nothing, and a group that lags by less (one that just started,
        or read a little later than the others) is waited for, as with `wait`."""
        self._expire(time.time())
        if self.policy != "skip":
            return
        h, rng = self.b._h, self.b._random()
        for _ in range(2 * self.count):
            missing = need - int(h[H_N_FREE])
            active = np.nonzero(self.meta[:, M_STATE] == ACTIVE)[0]
            if missing <= 0 or len(active) < 2:
                return
            n = self.meta[active, M_N]
            lead, excess = int(active[np.argmin(n)]), n - n.min() - int(SKIP_SLACK * self.capacity)
            for i in np.argsort(-excess, kind="stable").tolist():
                if excess[i] <= 0:
                    return
                if self._skip(int(active[i]), lead, min(missing, int(excess[i])), rng):
                    break
            else:
                return

    def _skip(self, g: int, lead: int, k: int, rng: np.random.Generator) -> bool:
        """Release up to k rows of group g's unread list (see on_full); False when none qualifies."""
        n, bit = int(self.meta[g, M_N]), np.uint64(1 << g)
        pos = rng.choice(n, size=min(n, 4 * k), replace=False, shuffle=False)
        owed = self.owed[self.ready[g, pos]]
        sole, lead_read = owed == bit, (owed & np.uint64(1 << lead)) == 0
        pos = np.concatenate([pos[sole], pos[lead_read & ~sole]])[:k]
        if len(pos) == 0:
            return False
        ids = remove_at(self.ready[g], n, pos)
        self.meta[g, M_N] = n - len(ids)
        self.meta[g, M_SKIPPED] += len(ids)
        self.owed[ids] &= ~bit
        self._settle(ids)
        return True

    def _expire(self, now: float) -> None:
        idle = self.idle_s
        for g in np.nonzero(self.meta[:, M_STATE] == ACTIVE)[0].tolist():
            if now - self.fmeta[g, MF_SEEN] > idle:
                self._drop(g, f"idle for more than buffer.group_idle_s={idle:g} s")

    def tick(self) -> None:
        """Periodic (the server's main process): drop idle groups, update each group's rows/s."""
        now = time.time()
        with self.b._lock:
            self._expire(now)
            live = {(g, int(self.meta[g, M_GEN])): int(self.meta[g, M_READ])
                    for g in np.nonzero(self.meta[:, M_STATE] == ACTIVE)[0].tolist()}
        self._rates = {key: self._rates.get(key, []) for key in live}
        for (g, gen), read in live.items():
            window = self._rates[(g, gen)]
            window.append((now, read))
            while len(window) > 2 and now - window[1][0] >= RATE_WINDOW_S:
                window.pop(0)
            if now > window[0][0]:
                self.fmeta[g, MF_RATE] = (read - window[0][1]) / (now - window[0][0])

    def on_refresh(self) -> int:
        """Every READY slot not being read goes FREE and no group owes any (POST /refresh)."""
        b = self.b
        ids = np.nonzero(b._state == READY)[0]
        self.owed[ids] = 0
        self.meta[:, M_N] = 0
        before = int(b._h[H_N_READY])
        self._settle(ids)
        n = before - int(b._h[H_N_READY])
        b._h[H_EPOCH] += 1
        b._h[H_REFRESHED] += n
        return n

    def reclaim(self) -> int:
        """Release the claims of readers that died mid-read: the rows count as read by their group (part
        of them may have reached the client), as the buffer does without groups. Scans O(capacity)."""
        from ..host import pid_alive

        freed = 0
        with self.b._lock:
            held = np.nonzero(self.busy)[0]
            for g in np.nonzero(self.meta[:, M_CLAIMS] > 0)[0].tolist():
                bit = np.uint64(1 << g)
                mine = held[(self.busy[held] & bit) != 0]
                dead = [p for p in np.unique(self.owner[g, mine]).tolist() if not pid_alive(p)]
                ids = mine[np.isin(self.owner[g, mine], dead)]
                if len(ids):
                    self.on_release(ids, GroupClaim(int(self.b._h[H_EPOCH]), g, -1))
                    freed += len(ids)
        return freed

    # -- what is visible --------------------------------------------------------------------------------
    def _entry(self, g: int) -> dict:
        m, f = self.meta[g], self.fmeta[g]
        return {"name": self._name(g), "state": STATE_NAMES.get(int(m[M_STATE]), "gone"),
                "rows_read": int(m[M_READ]), "lag": int(m[M_N]), "rows_per_s": float(f[MF_RATE]),
                "rows_skipped": int(m[M_SKIPPED]), "last_seen": float(f[MF_SEEN]),
                "registered": float(f[MF_REGISTERED])}

    def list(self) -> list[dict]:
        """The registered groups: name, state, rows_read, lag (rows ready to it it has not read), rows_per_s,
        rows_skipped, last_seen and registered (unix times)."""
        return [self._entry(g) for g in np.nonzero(self.meta[:, M_STATE] == ACTIVE)[0].tolist()]

    def describe(self) -> dict:
        """GET /groups: the groups, the lag policy, the maximum and the groups expected before serving."""
        return {"groups": self.list(), "group_policy": self.policy, "max_groups": self.count,
                "groups_expected": int(self.b._h[H_GROUPS_EXPECTED])}


def groups_off(name: Optional[str]) -> GroupRefused:
    return GroupRefused(409, f"group {name!r}: this server has no consumer groups; start it with "
                             "buffer.max_groups=N (N groups, each receives every row)")


def group_claim(buf, name: Optional[str], k: int):
    """`buf.claim_ready` for a buffer with groups, or for a group asked of a buffer without."""
    if buf.groups is None:
        raise groups_off(name)
    return buf.groups.claim(name, k)
