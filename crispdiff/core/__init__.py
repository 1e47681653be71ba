"""The bottom layer: user errors, durable file writes, image helpers and the flag dataclasses every command shares."""
