"""`lmserve router`: the cluster's front door. An OpenAI-compatible proxy in front of several
`lmserve serve` engines, with round-robin, session, least-loaded and prefix-aware routing,
static or Kubernetes discovery, health checks and failover.

It imports neither torch nor the engine (tests/router/test_cli_router.py checks), so it starts
in well under a second and its container image needs only the web stack.

    app.py          build_app / run_router: routes and lifespan
    proxy.py        one request: parse, route, send, relay (retry before the first byte)
    routing.py      the routing logics        prefix_trie.py   the bounded prefix trie
    backends.py     Backend / BackendPool     health.py        health checks, load scraping
    discovery.py    static list, Kubernetes   metrics.py       the router's Prometheus series
    config.py       RouterConfig and the command-line flags
"""
