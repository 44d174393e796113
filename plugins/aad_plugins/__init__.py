"""aad's default plugins. Each module is an ordinary plugin, registered through the ``aad``
entry-point group exactly as a third-party plugin would be (see pyproject.toml)."""
