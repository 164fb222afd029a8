"""Experiment drivers: logic modules behind the long-running CLI commands (each with a thin ``register``)."""
