"""The fault suite: `python -m chaos` (or `make chaos`).

Each fault class drives the real parts (the sandbox Plane, Gitea, Telegram and agent, a real
SQLite file, real git repositories, `conveyor run` as a subprocess where a crash matters)
through one kind of failure, checks the invariants of DESIGN §6 and prints one line with its
figures. Every random choice comes from one seed, so a failing run can be repeated.
"""
