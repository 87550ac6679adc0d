"""Engine integrations: thin adapters between an engine's world and kvplug's plain tensors."""
