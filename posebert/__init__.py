"""The `posebert` command: a dispatcher over the stage packages (no logic of its own)."""
