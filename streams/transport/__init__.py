"""Connection plumbing every side shares: MQTT settings and client helpers (`mqtt`), and the
pieces of HTTP hosting (`web`). The unit's own MQTT client is `processors.wire`."""
