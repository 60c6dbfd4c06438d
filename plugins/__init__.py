"""Built-in persona-harness plugins (imported as ``harness_plugins``)."""
