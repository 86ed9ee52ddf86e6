"""Every Redis key and channel the project writes or reads, named in one place.

All of them live under ``GATEWAY_KEY_PREFIX`` (``gw:`` by default). Operators read and
write some of them by hand (``redis-cli HSET gw:client:abc disabled 1``), and replicas of
two releases share them during a rolling upgrade, so the strings built here are a
contract: a change to any of them is a change of :data:`SCHEMA_VERSION`.

No other module formats a key: each one asks :class:`Keys` (``tests/test_schema.py``
greps the source to keep it so). Lua scripts receive their keys in ``KEYS[]``, built
here; the usage scripts, which name their keys inside Redis for speed, build them with
:data:`USAGE_KEY_LUA`, the Lua twin of :meth:`Keys.usage`.

The gateway's keys (``README.md`` lists them for security staff):

| key | type | what |
|---|---|---|
| ``client:{id}`` | hash | a client's governance record (and the built-in server's client) |
| ``user:{subject}`` | hash | a person's governance record (``disabled``), by token subject |
| ``token:{digest}`` | string | a cached validation result, or the revoked-token pin |
| ``audit`` | stream | administrative and security events |
| ``events`` | channel | change notices to every replica |
| ``usage:req:{{id}}:{minute}`` | string | requests of a client in one minute |
| ``usage:tok:{{id}}:{minute}`` | HyperLogLog | distinct token digests of a client in one minute |
| ``usage:clients`` | sorted set | clients by last use |
| ``usage:hour:{{id}}:{hour}`` | string | requests of a client in one clock hour, 25 h |
| ``usage:decisions:{minute}`` | hash | authentication decisions fleet-wide in one minute |
| ``ratelimit:{{id}}:{period}:{window}`` | string | a client's rate-limited units in one window |
| ``meta:digest_key`` | string | the fleet's token-digest key |
| ``upstream_cred:{identity}`` | string | the service identity's upstream token, AES-GCM encrypted |
| ``upstream_cred_lock:{identity}`` | string | who is signing that identity in (fencing token) |
| ``upstream_cred_fence:{identity}`` | string | counter of those sign-ins (the fencing tokens) |
| ``meta:schema`` | string | the version of this layout (:data:`SCHEMA_VERSION`) |

The built-in authorization server's (the ``as_*`` members):

| key | type | what |
|---|---|---|
| ``as:clients`` | set | ids of clients this server manages |
| ``as:user:{username}`` | hash | ``sub``; ``password_hash`` (local), ``sso``/``sso_sub`` (SSO) |
| ``as:sso:{issuer}|{sub}`` | string | username mapped to an SSO subject |
| ``as:sso_state:{digest}`` | string | an SSO login in progress (nonce, PKCE verifier), 600 s |
| ``as:session:{digest}`` | string | a browser session (user, auth time, method), 8 h |
| ``as:authz:{digest}`` | string | a pending consent request (JSON), 600 s |
| ``as:signing_keys`` | hash | RFC 9068 signing keys (private keys AES-GCM encrypted) |
| ``as:grant:{id}`` | hash | one grant (user + client + device) |
| ``as:grants`` / ``as:client_grants:{id}`` / ``as:user_grants:{name}`` | set | grant indexes |
| ``as:grant_tokens:{id}`` | set | ``at:{digest}`` / ``rt:{digest}`` issued under a grant |
| ``as:at:{digest}`` | string | access token record (JSON), TTL = its lifetime |
| ``as:rt:{digest}`` | string | refresh token record (JSON), TTL = its lifetime |
| ``as:rt_spent:{digest}`` | string | set once a rotatable refresh token is used (reuse detection) |
| ``as:code:{digest}`` | string | authorization code (JSON), 60 s, redeemed with GETDEL |
| ``as:code_used:{digest}`` | string | grant id issued by a redeemed code (replay detection) |
| ``as:device:{digest}`` | string | device authorization (JSON) |
| ``as:user_code:{code}`` | string | device code digest for a user code |
| ``as:device_poll:{digest}`` | hash | last poll time and current interval (``slow_down``) |
| ``as:device_decision:{digest}`` | string | the user's approve/deny, set once |
| ``as:rate:{name}:{window}`` | string | rate-limit counters (logins, user codes, SSO starts) |
| ``as:tenant`` | hash | tenant settings set in the console or admin API (over the environment's) |

Tokens, codes, sessions and device codes appear in keys only as keyed digests.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1
"""The version of the layout below, kept in :attr:`Keys.schema`. Raised only for a change
an older release would misread (a key renamed, a field's meaning changed); new keys,
new hash fields, new event types and new audit actions are additive and keep it."""

USAGE_KEY_LUA = """
local function usage_key(prefix, kind, cid, bucket)
  return prefix .. kind .. ':{' .. cid .. '}:' .. bucket
end
"""
"""Lua for :meth:`Keys.usage`, prepended to the scripts that name usage buckets inside
Redis: ``usage_key(ARGV[1], 'req', cid, bucket)`` where ``ARGV[1]`` is
:attr:`Keys.usage_prefix`."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The names of every key and channel under one prefix (``Keys("gw:").client("abc")``
    is ``gw:client:abc``). Each member's docstring says the type, what it holds and how
    long it lives."""

    prefix: str = "gw:"

    # -- the gateway -------------------------------------------------------------

    def client(self, client_id: str) -> str:
        """Hash, no TTL: a client's record. ``disabled`` (``"1"`` disables) and ``scopes``
        (space-separated; narrows the token's scopes) are what the gateway enforces;
        ``updated_at``, ``updated_by`` and ``reason`` say who changed it, when, why. The
        built-in server keeps its client here too (``managed="1"``, ``name``,
        ``grant_type``, ``redirect_uris``, ``secret_hash``, the token policy...). Written
        by ``oauth-gateway clients``, the built-in server's admin and ``redis-cli``."""
        return f"{self.prefix}client:{client_id}"

    @property
    def client_pattern(self) -> str:
        """SCAN pattern matching every :meth:`client` key."""
        return f"{self.prefix}client:*"

    def client_id_of(self, key: str) -> str:
        """The client id in a :meth:`client` key."""
        return key[len(self.prefix) + len("client:"):]

    def client_notifications(self, db: int) -> str:
        """Pub/sub pattern: keyspace notifications of every :meth:`client` key in
        database ``db`` (when the server sends them; ``redis-cli HSET`` publishes nothing
        else)."""
        return f"{self.client_notification_prefix(db)}*"

    def client_notification_prefix(self, db: int) -> str:
        """What a keyspace notification channel of a client record starts with; the
        client id follows."""
        return f"__keyspace@{db}__:{self.prefix}client:"

    def user(self, subject: str) -> str:
        """Hash, no TTL: a person's record, under the subject of their tokens (an
        introspection or JWT ``sub``, Anaplan's ``userInfo.userGuid``, the built-in
        server's user id). ``disabled`` (``"1"`` disables) is what the gateway enforces:
        every token of that subject is refused. ``updated_at``, ``updated_by``, ``reason``
        (and ``username``, when named by a built-in server's username) say who changed it,
        when, why. Written by ``oauth-gateway users disable|enable`` and ``redis-cli``."""
        return f"{self.prefix}user:{subject}"

    @property
    def user_pattern(self) -> str:
        """SCAN pattern matching every :meth:`user` key."""
        return f"{self.prefix}user:*"

    def user_subject_of(self, key: str) -> str:
        """The subject in a :meth:`user` key."""
        return key[len(self.prefix) + len("user:"):]

    def user_notifications(self, db: int) -> str:
        """Pub/sub pattern: keyspace notifications of every :meth:`user` key in
        database ``db``."""
        return f"{self.user_notification_prefix(db)}*"

    def user_notification_prefix(self, db: int) -> str:
        """What a keyspace notification channel of a person's record starts with; the
        subject follows."""
        return f"__keyspace@{db}__:{self.prefix}user:"

    def token(self, digest: str) -> str:
        """String: the fleet's cache of a token's validation (``TokenInfo`` JSON, never the
        token), under its keyed digest. TTL: never past the token's ``exp`` nor
        ``GATEWAY_CACHE_MAX_TTL``; ``GATEWAY_NEGATIVE_CACHE_TTL`` for an inactive answer.
        A revoked token holds :data:`gateway.state.events.REVOKED_MARKER` instead, for as
        long as the revocation is pinned."""
        return f"{self.prefix}token:{digest}"

    @property
    def token_pattern(self) -> str:
        """SCAN pattern matching every :meth:`token` key."""
        return f"{self.prefix}token:*"

    @property
    def audit(self) -> str:
        """Stream, capped near 100,000 entries: who did what, when (never a secret).
        Entries are built by :mod:`gateway.state.events`; ``oauth-gateway audit tail``
        reads it."""
        return f"{self.prefix}audit"

    @property
    def events(self) -> str:
        """Pub/sub channel: JSON change notices every replica's subscriber applies
        (:mod:`gateway.state.events` builds and parses them)."""
        return f"{self.prefix}events"

    @property
    def usage_prefix(self) -> str:
        """What every usage bucket and :attr:`usage_clients` start with (handed to the
        usage scripts, which build the rest with :data:`USAGE_KEY_LUA`)."""
        return f"{self.prefix}usage:"

    def usage(self, kind: str, client_id: str, bucket: int) -> str:
        """A client's usage in one minute (``bucket`` = Unix minute), TTL the usage
        window + 60 s. ``kind`` ``req``: string, INCRBY of requests; ``tok``:
        HyperLogLog of token digests. The client id is in literal braces
        (``gw:usage:req:{app1}:29340961``), a Redis Cluster hash tag: a client's buckets
        share one slot, so a window is summed in one command."""
        return f"{self.prefix}usage:{kind}:{{{client_id}}}:{bucket}"

    def usage_decisions(self, bucket: int) -> str:
        """Hash: the fleet's authentication decisions (field: the ``decision`` label of
        ``gateway_auth_decisions_total``) in one minute (``bucket`` = Unix minute), kept
        an hour."""
        return f"{self.prefix}usage:decisions:{bucket}"

    @property
    def usage_clients(self) -> str:
        """Sorted set: client ids scored by their last use (Unix time), trimmed to the
        usage window."""
        return f"{self.prefix}usage:clients"

    def rate_limit(self, client_id: str, period: int, window: int) -> str:
        """String, INCRBY: the units (requests times route weight) the fleet admitted for
        a client in fixed window number ``window`` (Unix time // ``period``) of its rate
        limit's ``period`` seconds; TTL two periods. A changed period starts new keys. The
        client id is a Redis Cluster hash tag, as in :meth:`usage`."""
        return f"{self.prefix}ratelimit:{{{client_id}}}:{period}:{window}"

    @property
    def digest_key(self) -> str:
        """String, no TTL: the hex key of the keyed token digest, created once with SET NX
        when ``GATEWAY_TOKEN_DIGEST_KEY`` is not set, and shared by the fleet."""
        return f"{self.prefix}meta:digest_key"

    def upstream_credential(self, identity: str) -> str:
        """String: a ``credentials: service`` identity's upstream token and its expiry
        (JSON, AES-256-GCM encrypted under ``GATEWAY_SECRET_KEYS``), with the fencing
        token of the sign-in that wrote it. TTL: the token's own expiry."""
        return f"{self.prefix}upstream_cred:{identity}"

    def upstream_credential_lock(self, identity: str) -> str:
        """String: the fencing token of the replica signing ``identity`` in, SET NX PX:
        one sign-in for the fleet. TTL: the sign-in's time limit."""
        return f"{self.prefix}upstream_cred_lock:{identity}"

    def upstream_credential_fence(self, identity: str) -> str:
        """String, no TTL: a counter (INCR) handing out the fencing tokens of
        ``identity``'s sign-ins; a write carrying an older one than stored is refused."""
        return f"{self.prefix}upstream_cred_fence:{identity}"

    def anaplan_signin(self, subject: str) -> str:
        """String, no TTL: a person's Anaplan sign-in ("Sign in with Anaplan"): their
        Anaplan access and refresh tokens, expiry and username (JSON, AES-256-GCM
        encrypted under ``GATEWAY_SECRET_KEYS``), under their subject (``userGuid``).
        Replaced by compare-and-set only; deleted when Anaplan refuses its refresh."""
        return f"{self.prefix}anaplan_signin:{subject}"

    @property
    def sealed_patterns(self) -> tuple[str, ...]:
        """SCAN patterns of every value sealed under ``GATEWAY_SECRET_KEYS``
        (:meth:`upstream_credential`, :meth:`anaplan_signin`), for re-sealing."""
        return (f"{self.prefix}upstream_cred:*", f"{self.prefix}anaplan_signin:*")

    def anaplan_signin_lock(self, subject: str) -> str:
        """String, SET NX PX: the replica refreshing a person's Anaplan token (a random
        owner value): one refresh for the fleet. TTL: the refresh's time limit."""
        return f"{self.prefix}anaplan_signin_lock:{subject}"

    @property
    def schema(self) -> str:
        """String, no TTL: :data:`SCHEMA_VERSION` of the layout in this Redis, written with
        SET NX by the gateway at start-up and by the CLI before it writes."""
        return f"{self.prefix}meta:schema"

    # -- the built-in authorization server --------------------------------------

    @property
    def as_clients(self) -> str:
        """Set: ids of the clients the built-in server manages (their records are
        :meth:`client` hashes)."""
        return f"{self.prefix}as:clients"

    @property
    def as_tenant(self) -> str:
        """Hash: tenant settings an administrator set (``self_service``, ``flows``, the
        default token policy, ``admin_groups``), winning over the environment's."""
        return f"{self.prefix}as:tenant"

    def as_user(self, username: str) -> str:
        """Hash, no TTL: a user. ``sub``, ``created_at``; ``password_hash`` (local) or
        ``sso``/``sso_sub`` (signed in through company SSO); ``admin`` (``1``: the admin
        role)."""
        return f"{self.prefix}as:user:{username}"

    @property
    def as_user_pattern(self) -> str:
        """SCAN pattern matching every :meth:`as_user` key."""
        return f"{self.prefix}as:user:*"

    def as_username_of(self, key: str) -> str:
        """The username in an :meth:`as_user` key."""
        return key[len(self.prefix) + len("as:user:"):]

    def as_sso(self, issuer: str, sub: str) -> str:
        """String, no TTL: the username linked to an SSO provider's subject."""
        return f"{self.prefix}as:sso:{issuer}|{sub}"

    def as_sso_state(self, digest: str) -> str:
        """String, 600 s: an SSO login in progress (JSON: nonce, PKCE verifier, browser,
        next page), under the digest of its ``state``; taken with GETDEL."""
        return f"{self.prefix}as:sso_state:{digest}"

    def as_session(self, digest: str) -> str:
        """String, 8 h: a browser session (JSON: username, sub, auth time, method), under
        the digest of its cookie."""
        return f"{self.prefix}as:session:{digest}"

    def as_authz(self, digest: str) -> str:
        """String, 600 s: a consent page waiting for its answer (JSON), under the digest
        of its request id; taken with GETDEL."""
        return f"{self.prefix}as:authz:{digest}"

    @property
    def as_signing_keys(self) -> str:
        """Hash, no TTL: the RFC 9068 signing keys, field = ``kid``, value = JSON with the
        private key AES-GCM encrypted; rotated by the servers themselves."""
        return f"{self.prefix}as:signing_keys"

    def as_grant(self, grant_id: str) -> str:
        """Hash, no TTL: one grant (user + client + device): scope, times, ``revoked``."""
        return f"{self.prefix}as:grant:{grant_id}"

    @property
    def as_grants(self) -> str:
        """Set: every grant id."""
        return f"{self.prefix}as:grants"

    def as_client_grants(self, client_id: str) -> str:
        """Set: the grant ids of one client."""
        return f"{self.prefix}as:client_grants:{client_id}"

    def as_user_grants(self, username: str) -> str:
        """Set: the grant ids of one user."""
        return f"{self.prefix}as:user_grants:{username}"

    def as_grant_tokens(self, grant_id: str) -> str:
        """Set: the tokens issued under a grant, as :meth:`grant_token_member` values."""
        return f"{self.prefix}as:grant_tokens:{grant_id}"

    @staticmethod
    def grant_token_member(kind: str, digest: str) -> str:
        """A member of :meth:`as_grant_tokens`: ``at:{digest}`` or ``rt:{digest}``."""
        return f"{kind}:{digest}"

    @staticmethod
    def parse_grant_token_member(member: str) -> tuple[str, str]:
        """``(kind, digest)`` of a :meth:`grant_token_member`."""
        kind, _, digest = member.partition(":")
        return kind, digest

    def as_token(self, kind: str, digest: str) -> str:
        """String: an issued token's record (JSON), TTL the token's lifetime. ``kind``
        ``at``: an access token; ``rt``: a refresh token."""
        return f"{self.prefix}as:{kind}:{digest}"

    def as_token_of_member(self, member: str) -> str:
        """The :meth:`as_token` key a :meth:`grant_token_member` names."""
        return f"{self.prefix}as:{member}"

    def as_rt_spent(self, digest: str) -> str:
        """String ``"1"``, TTL the refresh token's remaining life: a rotatable refresh
        token was used (SET NX; a second use is a replay)."""
        return f"{self.prefix}as:rt_spent:{digest}"

    def as_code(self, digest: str) -> str:
        """String, 60 s: an authorization code's record (JSON); redeemed with GETDEL."""
        return f"{self.prefix}as:code:{digest}"

    def as_code_used(self, digest: str) -> str:
        """String: the grant id a redeemed code produced (replay detection), for a while
        after the code's life."""
        return f"{self.prefix}as:code_used:{digest}"

    def as_device(self, digest: str) -> str:
        """String: a device authorization (JSON), under the digest of its device code;
        TTL ``expires_in`` + 600 s so a late poll still hears ``expired_token``."""
        return f"{self.prefix}as:device:{digest}"

    def as_user_code(self, user_code: str) -> str:
        """String: the device code digest a user code stands for; TTL as :meth:`as_device`."""
        return f"{self.prefix}as:user_code:{user_code}"

    def as_device_poll(self, digest: str) -> str:
        """Hash: a device's polling state: ``last`` poll time, ``interval`` in force,
        ``expired`` once an expired code was polled; TTL as :meth:`as_device`."""
        return f"{self.prefix}as:device_poll:{digest}"

    def as_device_decision(self, digest: str) -> str:
        """String ``"1"``: the user approved or denied the device (SET NX: once)."""
        return f"{self.prefix}as:device_decision:{digest}"

    def as_rate(self, name: str, window: int) -> str:
        """String, TTL two windows: a rate-limit counter (logins, user-code entries, SSO
        starts) for the fixed window number ``window``."""
        return f"{self.prefix}as:rate:{name}:{window}"

    def as_login_backoff(self, digest: str) -> str:
        """Hash, TTL one day after the last failure: failed sign-ins of one user from one
        source (or one known browser), under the digest of the pair: ``failures``, ``last``
        (epoch seconds of the latest)."""
        return f"{self.prefix}as:login_backoff:{digest}"

    # -- what a backup holds -----------------------------------------------------

    @property
    def durable_patterns(self) -> tuple[str, ...]:
        """SCAN patterns of the keys ``oauth-gateway export`` copies and ``import``
        accepts: client and person records, people's sealed Anaplan sign-ins, and the
        built-in server's clients, users, SSO links, signing keys, grants, their indexes
        and the live token records (with the spent-refresh and used-code markers that
        detect replays). Not caches, sessions, flows in progress, counters or the audit
        stream; the digest key (:attr:`digest_key`) is handled apart, sealed."""
        p = self.prefix
        return (f"{p}client:*", f"{p}user:*", f"{p}anaplan_signin:*", f"{p}as:clients",
                f"{p}as:user:*", f"{p}as:sso:*", f"{p}as:signing_keys", f"{p}as:grant:*",
                f"{p}as:grants", f"{p}as:client_grants:*", f"{p}as:user_grants:*",
                f"{p}as:grant_tokens:*", f"{p}as:at:*", f"{p}as:rt:*", f"{p}as:rt_spent:*",
                f"{p}as:code_used:*", f"{p}as:tenant")

    def relative(self, key: str) -> str:
        """``key`` without the prefix (a backup names keys so, to restore under another)."""
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def absolute(self, name: str) -> str:
        """The key a :meth:`relative` name stands for under this prefix."""
        return f"{self.prefix}{name}"
