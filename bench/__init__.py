"""The gateway's benchmark: how much it costs next to the thinnest possible proxy.

    python -m bench [--duration S] [--connections N] [--scenarios ...] [--quick]

Run from the repository root; not part of the installed package. Everything runs on
this machine, on loopback, each server in a process of its own so that the load
generator never shares an event loop (or a starved core) with what it measures:

- ``services.py``     the stand-in upstream, the RFC 7662 introspection endpoint and the
                      *reference bare proxy* (forward, strip hop-by-hop headers, stream);
- ``processes.py``    starting and stopping them and the gateway itself as
                      ``oauth-gateway serve`` (Redis is :mod:`gateway.state.embedded`'s);
- ``load.py``         the load: ``wrk`` when it is on PATH (a generated Lua script sets
                      each request's token), else a built-in asyncio generator;
- ``harness.py``      the options, the servers every scenario shares, and bare and
                      gateway loaded in alternating runs;
- ``scenarios.py``    steady, many-tokens, cold, bodies, scaling, latency, memory, and
                      the table of requests/s, p50, p99, CPU time per request and their
                      ratios;
- ``instructions.py`` the opt-in instruction count per request, under callgrind;
- ``nginx.py``        NGINX's own token-introspection design (auth_request, njs,
                      proxy_cache) started as a reference, and the ``nginx`` scenario
                      that sets the gateway against it;
- ``memory.py``       RSS growth of 100,000 tokens held by the in-process cache layer;
- ``propagation.py``  on its own (``python -m bench.propagation``): how fast a client
                      disable reaches every replica.

Read the ratios, not the absolute figures: on a 2-core machine the load generator,
the upstream, Redis and the proxy under test all compete for the same cores (by
default the proxy under test gets one to itself). docs/PERFORMANCE.md has the figures.
"""
