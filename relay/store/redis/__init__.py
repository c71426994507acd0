"""The Redis Streams store: history that survives relay restarts, shared by many relays.

Selected by `HIVE_RELAY_STORE=redis://…` or `rediss://…` (TLS),
`redis+sentinel://host:port[,…]/service`, or `redis+cluster://host:port[,…]`
(relay/store/redis_url.py); needs the `redis` extra and Redis 6.2 or newer (7 for
a Cluster: sharded pub/sub). Every instance behind a load balancer talks to the
same Redis, so any instance can serve any request (no sticky sessions).

One job per module:

    store.py    RedisStore, the Store protocol on top of the modules below
    scripts.py  the Lua scripts (relay/store/lua/*.lua, package data), run by SHA
    errors.py   what redis-py raises, as StoreBusy / StoreUnavailable
    connect.py  clients for one Redis, a Sentinel-managed primary, or a Cluster
    replicas.py WAIT for HIVE_RELAY_REDIS_MIN_REPLICAS on the write's own connection
    keys.py     key and channel names
    watch.py    live delivery: the watch state machine, on one pub/sub connection
                (or, on a Cluster, one SSUBSCRIBE connection per shard primary)
    slots.py    the Cluster's slot map, for the sharded links and WAIT writes
    stats.py    approximate relay-wide counters
    epoch.py    the name of the dataset's history

Key layout. All keys of a workspace share the hash tag `{ws}`, so they live in one
Redis Cluster slot and every Lua script touches one slot only:

    relay:{ws}:log        Stream. Entry id `<seq>-0`, fields r=<encoded row>, k=<dedup key>
    relay:{ws}:dedup      Hash  dedup key -> seq, for retained rows only
    relay:{ws}:meta       Hash  h=head, d=dropped horizon, n=retained rows, b=retained bytes,
                                c=confirmed head (rows shown to readers; = h without replica acks)
    relay:{ws}:keyring    List  of blobs
    relay:{ws}:presence   Hash  device -> data     (and relay:{ws}:presence:t, a sorted set
    relay:{ws}:candidates Hash  device -> data      device -> last write time, for the TTL)
    relay:{ws}:w          String, 1 s TTL: a Cluster's WAIT probe after an all-duplicate
                          append (replicas.py)
    relay:{pair}:c:<CODE> String payload, with the pairing TTL as Redis expiry
    relay:{pair}:idx      Sorted set code -> expiry (ms), to bound the number of codes
    relay:epoch           String: names this Redis dataset's history
    relay:stats           Hash: approximate relay-wide counters for the status page

Appends are one Lua script (atomic, all or nothing for a batch): dedup by key, seq by
the rule of relay.store.base.next_seq with Redis TIME, XADD, trim by count and age
(forgetting the dedup keys of dropped rows and recording the dropped horizon), and
PUBLISH (SPUBLISH on a Cluster) on the workspace's channel `relay:{ws}:n`. With
replica-acknowledged writes (HIVE_RELAY_REDIS_MIN_REPLICAS > 0) the script publishes
nothing: once WAIT counted the replicas, commit.lua raises the confirmed head (meta
field c) and publishes. Reads, and the watches of live delivery, see rows up to the
confirmed head only, so no relay shows a row before its WAIT succeeded
(docs/scaling.md). The message is `<prev head> <new head> [<seq>:<len> …]\\n<rows…>`:
the rows ride along when small, so a listening relay usually delivers without
reading the stream back (watch.py).

Every read fetches the epoch in the same round trip, and a background task checks it
each second (epoch.py).

Relay-wide byte budgets (HIVE_RELAY_MAX_BYTES, the side-channel share of it) are
not enforced here: set Redis `maxmemory` with `maxmemory-policy noeviction`; past it
Redis refuses writes and the relay answers 503 `relay_full` with Retry-After.
"""

from relay.store.redis.store import RedisStore

__all__ = ["RedisStore"]
