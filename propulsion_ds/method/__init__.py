"""The method: Propulsion vectors injected into frozen layers, their adapter files."""
