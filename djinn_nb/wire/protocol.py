"""Constants both ends of the wire agree on."""

#: Bumped whenever an exposed call changes; ``hello`` refuses a mismatch with a clear message.
PROTOCOL = 6
DEFAULT_PORT = 5556
