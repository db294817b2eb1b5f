"""Views: text, plots and graphs that only read the engine's records, never translate."""
