"""The safe server: ``pointsafe serve`` keeps one safe for many agents over HTTP(S).

Agents (``pointsafe backup SOURCE --server URL``) walk, chunk, hash and compress on their own
machine and upload only what the server lacks; the server verifies every object against its id,
stores it in the safe (sealed with the safe's key when it is encrypted) and commits each point
in one step. An agent token reaches only that agent's own points and objects. See docs/SERVER.md.

Rooms: server imports cas and ingest (and the web room's listening helpers); nothing imports
server but the CLI, lazily, and gc, lazily, for one hook (``agents.dropped_objects``: the
agents' counts and id rows of the objects gc removes, in the same transaction).
"""
