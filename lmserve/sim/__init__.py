"""`lmserve simulate`: a discrete-event simulation of a cluster of engines behind the router.

    profile.py    step-time model of one engine (fitted to `lmserve bench` results) + limits
    engine.py     a simulated engine: the scheduler's token budget, the prefix cache's blocks,
                  hashes, LRU and KV events; decode steps aggregated into runs
    workload.py   arrivals (bench serve's gamma process) and prompts as token ids: random,
                  prefix-repetition, multi-round-qa, trace replay
    autoscale.py  the Helm chart's KEDA/HPA rule
    cluster.py    the event loop; the router is lmserve/router's own classes
    report.py     percentiles, per-replica load, replicas over time, GPU-hours; plot
    cli.py        `lmserve simulate` and `lmserve simulate calibrate`

Imports neither torch nor the engine: it runs wherever the router does.
"""
