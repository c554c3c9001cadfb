"""The safe server: ``pointsafe serve`` keeps one safe for many agents over HTTP(S).

Agents (``pointsafe backup SOURCE --server URL``) walk, chunk, hash and compress on their own
machine and upload only what the server lacks; the server verifies every object against its id,
stores it in the safe (sealed with the safe's key when it is encrypted) and commits each point
in one step. An agent token reaches only that agent's own points and objects. See docs/SERVER.md.

Rooms: server imports cas, ingest, gc (forget), fusefs (mounts) and ops (the listener, tasks);
the CLI and the dashboard (web: its agents page) import server. The rows the safe keeps about
its agents' objects (their ids, their counts of bytes stored) are the safe's own,
cas/agent_rows.py, because gc keeps them true in the transaction that removes objects.
"""
