"""Integrations with the engines people serve with (each imports its engine lazily)."""
