"""``python -m bench.soak --minutes M``: days of daemon life in minutes.

One simulator (a few thousand images, latency with jitter), three ``image-sync run``
replicas (interval 10 s, every source) on a PostgreSQL cluster the soak owns, and a
driver that for the whole run changes 0-5 % of the catalogue at a time, turns API
faults and drift on and off, restarts PostgreSQL once, SIGKILLs a replica (and starts
a new one) and SIGTERMs one (and restarts it). Every few minutes, and at the end, the
driver pauses, faults go off, and after one quiet tick the checker compares the
inventory with the catalogue and its events with the simulator's change log
(:mod:`bench.soak.truth` says how). Resources are sampled every 10 s. The report is a
table on stdout, JSON and an SVG under ``bench/results/``; the exit code is 0 only
when every check passed. See ``bench/SOAK.md``.
"""
